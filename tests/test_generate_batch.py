"""`llmtune generate RUN --data prompts.jsonl --out answers.jsonl`: one answer per prompt, batched as generated one
by one, resumable without duplicates or half rows, written as `messages` rows that `sft` trains on."""

import json

import pytest

from llmtune.data import check_data
from llmtune.errors import UserError
from llmtune.tools import infer
from llmtune.tools.infer import Sampling, generate_file, load, prompt_ids

from .conftest import cli, make_recipe, write_jsonl

ROWS = [
    {"prompt": "Say hi"},
    {"prompt": [{"role": "user", "content": "Count to 3"}]},
    {"messages": [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "blue"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "What is up"}]},
    {"prompt": "Say bye"},
]
SAMPLING = Sampling(max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny(llmtune_cache):
    from llmtune.builtin import builtin_path

    return load(builtin_path("tiny"))


def conversations():
    """The conversation each row asks to answer."""
    return [[{"role": "user", "content": "Say hi"}], [{"role": "user", "content": "Count to 3"}],
            [{"role": "user", "content": "Name a color"}], ROWS[3]["messages"], [{"role": "user", "content": "Say bye"}]]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_answer_per_prompt_as_generated_one_by_one(tmp_path, tiny):
    data, out = write_jsonl(tmp_path / "prompts.jsonl", ROWS), tmp_path / "answers.jsonl"
    assert generate_file(tiny, data, out, SAMPLING, batch_size=2, progress=False) == (5, 0)
    written = rows(out)
    assert [row["messages"][:-1] for row in written] == conversations()
    alone = [tiny.tokenizer.decode(infer.generate(tiny, prompt_ids(tiny.tokenizer, turns), SAMPLING),
                                   skip_special_tokens=True) for turns in conversations()]
    assert [row["messages"][-1] for row in written] == [{"role": "assistant", "content": a} for a in alone]
    assert any(alone)  # something was generated to compare


def test_resume_after_interruption_writes_no_duplicate_and_no_half_row(tmp_path, tiny, monkeypatch):
    data, out = write_jsonl(tmp_path / "prompts.jsonl", ROWS), tmp_path / "answers.jsonl"
    real, calls = infer.generate_batch, []

    def killed_in_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(infer, "generate_batch", killed_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_file(tiny, data, out, SAMPLING, batch_size=2, progress=False)
    first = rows(out)
    assert len(first) == 2
    with out.open("a") as handle:  # a kill in the middle of writing a row
        handle.write('{"messages": [{"role": "user", "con')
    monkeypatch.setattr(infer, "generate_batch", real)
    assert generate_file(tiny, data, out, SAMPLING, batch_size=2, progress=False) == (3, 2)
    again = rows(out)
    assert again[:2] == first and [row["messages"][:-1] for row in again] == conversations()
    assert generate_file(tiny, data, out, SAMPLING, batch_size=2, progress=False) == (0, 5)  # all there


def test_answers_to_other_prompts_are_not_mixed_in(tmp_path, tiny):
    data, out = write_jsonl(tmp_path / "prompts.jsonl", ROWS), tmp_path / "answers.jsonl"
    write_jsonl(out, [{"messages": [{"role": "user", "content": "something else"},
                                    {"role": "assistant", "content": "x"}]}])
    with pytest.raises(UserError, match=r"answers.jsonl:1: this answer is to another prompt than row 1"):
        generate_file(tiny, data, out, SAMPLING, progress=False)


@pytest.mark.parametrize("row, match", [
    ({"text": "hi"}, "needs `prompt`.*this row has 'text'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "needs `prompt`"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "ends with a `assistant` turn"),
])
def test_bad_prompt_rows_name_file_and_line(tmp_path, tiny, row, match):
    data = write_jsonl(tmp_path / "prompts.jsonl", [ROWS[0], row])
    with pytest.raises(UserError, match=f"prompts.jsonl:2: .*{match}"):
        generate_file(tiny, data, tmp_path / "out.jsonl", SAMPLING, progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_the_answers_are_sft_data(tmp_path, tiny):
    data, out = write_jsonl(tmp_path / "prompts.jsonl", ROWS), tmp_path / "answers.jsonl"
    generate_file(tiny, data, out, SAMPLING, batch_size=4, system="Be brief.", progress=False)
    assert all(row["messages"][0] == {"role": "system", "content": "Be brief."} for row in rows(out))
    from llmtune.recipe.check import resolve

    resolved = resolve(make_recipe(tmp_path, data=out))
    check_data(resolved.config["data"], method="sft", seed=0, locate=resolved.locate,
               model=resolved.config["model"])  # raises on rows sft cannot train on


@pytest.mark.slow  # two CLI subprocesses and a short training run
def test_cli_generates_a_file_that_sft_trains_on(tmp_path):
    data, out = write_jsonl(tmp_path / "prompts.jsonl", ROWS * 4), tmp_path / "answers.jsonl"
    result = cli("generate", "builtin:tiny-unused", "--data", data)
    assert result.returncode == 2 and "--data PROMPTS.jsonl with --out ANSWERS.jsonl" in result.stderr
    from llmtune.builtin import builtin_path

    result = cli("generate", builtin_path("tiny"), "--data", data, "--out", out, "--batch-size", "8",
                 "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert f"wrote 20 answers to {out}" in result.stdout and len(rows(out)) == 20
    recipe = make_recipe(tmp_path, data=out, train={"max_steps": 3, "logging_steps": 1, "save_strategy": "no",
                                                    "per_device_train_batch_size": 4})
    result = cli("sft", recipe, "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data_shape"] == "conversational_language_modeling" and manifest["status"] == "completed"
    assert manifest["data"][0]["rows"] == 20
