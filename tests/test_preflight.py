"""Rows cut away by `data.max_length` are counted, named and left out, and the run reports the rows it trained."""

import json

import pytest

from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import cli, write_recipe

LONG = "word " * 300  # over 256 tokens with the byte tokenizer


@pytest.mark.slow
def test_rows_whose_prompt_fills_max_length_are_reported_left_out_and_counted(tmp_path):
    rows = [{"messages": [{"role": "user", "content": LONG if i % 4 == 1 else f"short {i}"},
                          {"role": "assistant", "content": "ok"}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", """\
method: sft
model: {name: "builtin:tiny", dtype: float32}
adapter: {type: lora, r: 8}
data: {train: [{path: chat.jsonl}], max_length: 256}
train: {max_steps: 2, per_device_train_batch_size: 4, gradient_checkpointing: false, save_strategy: "no",
        disable_tqdm: true}
""")
    warning = (f"warning: 10 of 40 rows of {tmp_path / 'chat.jsonl'} have a prompt of `data.max_length: 256` tokens "
               f"or more, so nothing of them would be trained; they are left out (the first: "
               f"{tmp_path / 'chat.jsonl'}:2)")
    validated = cli("validate", recipe)
    assert validated.returncode == 0 and warning in validated.stderr, validated.stderr
    out = tmp_path / "run"
    run(resolve(recipe), ["llmtune"], output_dir=str(out))
    source = json.loads((out / "manifest.json").read_text())["data"][0]
    assert (source["rows"], source["used"]) == (40, 30)
    assert "| 40 rows, 30 used |" in (out / "README.md").read_text()
    assert warning.removeprefix("warning: ") in (out / "train.log").read_text()
