"""`llmtune data inspect`: the marked tokens are the trained ones; template, stop token and truncation warnings."""

import re

import pytest

from llmtune.recipe.check import resolve
from llmtune.tools.inspect import TrainingView, inspect

from .conftest import cli, make_recipe, write_jsonl

CHAT = [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi!"}]}] * 16
# The tiny template with the assistant's end-of-turn token outside {% generation %}: never trained.
STOP_OUTSIDE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n"
                "{% generation %}{{ m['content'] }}{% endgeneration %}<|end|>\n{% else %}"
                "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}")
NO_MARKERS = STOP_OUTSIDE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def recipe(tmp_path, rows=CHAT, template=None, max_length=64):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    model = {}
    if template is not None:
        (tmp_path / "t.jinja").write_text(template)
        model["chat_template"] = tmp_path / "t.jinja"
    return make_recipe(tmp_path, data={"train": [{"path": data}], "max_length": max_length}, model=model)


def trained(stdout: str) -> list[str]:
    """The marked spans of the rendered samples (which are indented by four spaces)."""
    return re.findall(r"\[\[(.*?)\]\]", stdout.replace("\n    ", "\n"), re.S)


@pytest.mark.slow
def test_marks_exactly_the_assistant_tokens_and_the_stop_token(tmp_path):
    result = cli("data", "inspect", recipe(tmp_path), "--rows", "2")
    assert result.returncode == 0, result.stderr
    assert trained(result.stdout) == ["hi!<|end|>", "hi!<|end|>"]
    assert "    <s><|user|>\n    Say hi<|end|>\n    <|assistant|>\n    [[hi!<|end|>]]" in result.stdout
    assert "messages (column 'messages' found), 16 rows" in result.stdout
    assert "stop token '<|end|>' (id 257): trained in 2 of 2" in result.stdout
    assert "warning" not in result.stderr


@pytest.mark.parametrize("row, marked", [
    ({"instruction": "Say", "input": "hi", "output": "hi!"}, "hi!<|end|>\n"),
    ({"prompt": "Say hi:", "completion": " hi!"}, " hi!<|end|>"),
    ({"text": "hi there"}, "hi there<|end|>"),
])
def test_marked_tokens_are_the_labels_sft_trains(tmp_path, row, marked):
    """What inspect marks is what SFTTrainer (with a model) puts in `labels`."""
    from llmtune.data import load_data
    from llmtune.methods import sft
    from llmtune.model import load_model
    from llmtune.runner.trainer_args import training_args
    from llmtune.tokenizer import load_tokenizer

    resolved = resolve(recipe(tmp_path, rows=[row] * 16))
    lines, warnings = inspect(resolved, rows=1)
    assert trained("\n".join(lines)) == [marked]

    data = load_data(resolved.config["data"], method="sft", seed=0)
    tokenizer = load_tokenizer(resolved.config["model"])
    args = training_args(resolved, tmp_path / "scratch", sft.defaults(resolved.config, data))
    trainer = sft.build_trainer(args=args, model=load_model(resolved.config), tokenizer=tokenizer, data=data,
                                peft_config=None, callbacks=[])
    real = trainer.train_dataset[0]
    view = TrainingView(resolved, tokenizer, data)
    mine = view.tokenize([r for r, _ in view.rows(data.train.select([0]))])[0]
    assert mine["input_ids"] == real["input_ids"] and mine["labels"] == real["labels"]


@pytest.mark.slow
def test_template_without_generation_markers_is_masked_by_rendering(tmp_path):
    prompted = NO_MARKERS + "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    result = cli("data", "inspect", recipe(tmp_path, template=prompted))
    assert result.returncode == 0, result.stderr
    assert "assistant turns are found by rendering" in result.stdout and "warning" not in result.stderr
    assert trained(result.stdout) == ["hi!<|end|>"]
    # Without a generation prompt the model itself must write the role header at inference: it is trained, and said.
    result = cli("data", "inspect", recipe(tmp_path, template=NO_MARKERS))
    assert trained(result.stdout) == ["<|assistant|>\nhi!<|end|>"]
    assert "adds '<|assistant|>\\n' before the assistant's text in 16 turn(s)" in result.stderr
    # Every token, on request.
    result = cli("data", "inspect", recipe(tmp_path, template=prompted), "--set", "train.assistant_only_loss=false")
    assert trained(result.stdout) == ["<s><|user|>\nSay hi<|end|>\n<|assistant|>\nhi!<|end|>\n"]
    assert "every token trains" in result.stdout


@pytest.mark.slow
def test_untrained_stop_token_is_flagged(tmp_path):
    result = cli("data", "inspect", recipe(tmp_path, template=STOP_OUTSIDE))
    assert result.returncode == 0, result.stderr
    assert trained(result.stdout) == ["hi!"]
    assert "NOT trained" in result.stdout and "no stop token is trained" in result.stderr


@pytest.mark.slow
def test_template_trl_patches_for_training_is_shown_and_a_foreign_stop_token_flagged(tmp_path):
    """A known family's template without markers: TRL trains with its patched copy. Its end of turn
    `<|im_end|>` is no token of the tiny tokenizer, so the model never learns a token it could stop at."""
    result = cli("data", "inspect", recipe(tmp_path, max_length=256), "--set", "model.chat_template=qwen2_5")
    assert result.returncode == 0, result.stderr
    assert "TRL's training version" in result.stdout
    assert trained(result.stdout) == ["\nhi!<|im_end|>\n"]
    assert "no stop token is trained ('<|end|>' never gets a label)" in result.stderr


@pytest.mark.slow
def test_truncated_rows_are_counted_and_flagged(tmp_path):
    # A long answer is cut at its end; a prompt that fills max_length leaves nothing to train: that row is left out.
    rows = CHAT + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 80}]},
                   {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "ok"}]}]
    result = cli("data", "inspect", recipe(tmp_path, rows=rows, max_length=40))
    assert result.returncode == 0, result.stderr
    assert "1 longer than max_length 40" in result.stdout
    assert "1 of 17 rows are longer than `data.max_length: 40`" in result.stderr
    assert (f"1 of 18 rows of {tmp_path / 'data.jsonl'} have a prompt of `data.max_length: 40` tokens or more, so "
            f"nothing of them would be trained; they are left out (the first: {tmp_path / 'data.jsonl'}:18)") \
        in result.stderr


@pytest.mark.slow
def test_colour_in_a_terminal_instead_of_brackets(tmp_path):
    result = cli("data", "inspect", recipe(tmp_path), "--color")
    assert "\033[1;32mhi!<|end|>\033[0m" in result.stdout and "[[" not in result.stdout


def test_bad_data_exits_2_with_the_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", CHAT)
    path.write_text(path.read_text() + '{"messages": [oops\n')
    make_recipe(tmp_path, data={"train": [{"path": path}], "max_length": 64})
    result = cli("data", "inspect", tmp_path / "r.yaml")
    assert result.returncode == 2 and "data.jsonl:17: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
