"""`data.streaming: true`: sources read while training, checked at the head, mixed by weight."""

import collections
import hashlib
import json

import pytest
from typer.testing import CliRunner

from llmtune.cli import app
from llmtune.data import load_data
from llmtune.data.stream import CHECK_ROWS
from llmtune.errors import StreamedRowError, UserError
from llmtune.recipe.check import resolve
from llmtune.runner.session import TrainingFailed
from llmtune.runner.session import train as run

from .conftest import RECIPES, ROOT, built_trainer, cli, make_recipe, write_jsonl

CHAT = RECIPES / "data" / "chat.jsonl"
def recipe(tmp_path, data=CHAT, method="sft", eval_=None, name="r"):
    return make_recipe(tmp_path, method, {"train": [{"path": data}], "eval": eval_, "max_length": 128,
                                          "streaming": True}, name=name,
                       adapter={"type": "lora", "r": 8, "alpha": 16},
                       train={"learning_rate": 3.0e-3, "max_steps": 20, "per_device_train_batch_size": 8,
                              "gradient_checkpointing": False, "logging_steps": 2, "save_strategy": "no",
                              "disable_tqdm": True})


def chat_rows():
    return [json.loads(line) for line in CHAT.read_text().splitlines()]


@pytest.mark.slow
def test_streaming_sft_trains_and_records_the_stream(tmp_path):
    out = tmp_path / "run"
    eval_file = write_jsonl(tmp_path / "eval.jsonl", chat_rows()[:16])
    metrics = run(resolve(recipe(tmp_path, eval_=[{"path": eval_file}])), ["llmtune", "sft"], output_dir=str(out))
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"], metrics
    assert "eval_loss" in metrics
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["data"][0]
    # Not counted in advance, but the bytes read are pinned.
    assert source["rows"] is None and source["used"] is None
    assert source["sha256"] == hashlib.sha256(CHAT.read_bytes()).hexdigest()
    assert "| messages | streamed |" in (out / "README.md").read_text()

    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None


def test_one_pass_over_the_stream_yields_each_row_once_converted(tmp_path):
    # Spread over three file types, one of them Parquet read in batches; an alpaca source
    # ends up as conversations like the others.
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    rows = chat_rows()
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:100])
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[100:]), folder / "b.parquet", row_group_size=16)
    data = {"train": [{"path": str(folder)}], "eval": None, "max_length": 128, "streaming": True}
    streamed = load_data(data, method="sft", seed=7)
    whole = load_data({**data, "streaming": False}, method="sft", seed=7)

    def key(row):
        return json.dumps(row["messages"], sort_keys=True)

    assert collections.Counter(map(key, streamed.train)) == collections.Counter(map(key, whole.train))
    assert streamed.shape == whole.shape == "conversational_language_modeling"
    # Shuffled with the seed: the same order on every run, not the file's order.
    order = [key(r) for r in streamed.train]
    assert [key(r) for r in load_data(data, method="sft", seed=7).train] == order != list(map(key, rows))


def test_weights_are_shares_of_the_interleaved_stream(tmp_path):
    rows = chat_rows()
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": r["messages"], "src": "a"} for r in rows])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": r["messages"][0]["content"],
                                            "completion": r["messages"][1]["content"]} for r in rows])
    data = {"train": [{"path": str(a), "weight": 3.0, "columns": {}}, {"path": str(b), "weight": 1.0}],
            "eval": None, "max_length": 128, "streaming": True}
    with pytest.raises(UserError):  # plain prompt-completion cannot mix with conversations
        load_data(data, method="sft", seed=1)
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": r["messages"][0]["content"], "input": "",
                                            "output": "B " + r["messages"][1]["content"]} for r in rows])
    data["train"][1]["path"] = str(b)
    first = [row for _, row in zip(range(400), load_data(data, method="sft", seed=1).train)]
    from_b = sum(row["messages"][-1]["content"].startswith("B ") for row in first)
    assert 0.15 < from_b / len(first) < 0.35, from_b  # weight 1 of 4


@pytest.mark.slow
def test_validate_reads_the_head_and_a_later_bad_row_stops_the_run_at_its_line(tmp_path):
    rows = chat_rows()
    bad_line = CHECK_ROWS + 200
    lines = [json.dumps(rows[i % len(rows)]) for i in range(bad_line + 50)]
    lines[bad_line - 1] = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n")
    path = recipe(tmp_path, data=data)
    assert cli("validate", path).returncode == 0
    with pytest.raises(TrainingFailed) as failed:
        run(resolve(path, ["train.max_steps=400"]), ["llmtune", "sft"], output_dir=str(tmp_path / "run"))
    assert f"big.jsonl:{bad_line}: unknown role 'robot'" in str(failed.value.__cause__ or failed.value)
    # A bad row inside the head is caught before the run, like any data error.
    lines[10] = lines[bad_line - 1]
    data.write_text("\n".join(lines) + "\n")
    result = cli("validate", path)
    assert result.returncode == 2 and "big.jsonl:11: unknown role 'robot'" in result.stderr, result.stderr


@pytest.mark.parametrize("sets, where, message", [
    (["method=dpo"], ":8:3", "`llmtune dpo` cannot stream its data"),
    (["train.max_steps=-1"], ":8:3", "set `train.max_steps:`"),
    (["data.eval=0.1"], "--set data.eval=0.1", "a fraction of a stream cannot be held out"),
    (["data.curate.dedup=true"], ":4:1", "cannot run on a stream"),  # the `data:` that --set extended
])
def test_what_a_stream_cannot_do_is_refused_at_the_key(tmp_path, sets, where, message):
    path = recipe(tmp_path)
    with pytest.raises(UserError) as refused:
        resolve(path, sets)
    (problem,) = refused.value.problems
    assert problem.startswith(f"{path}{where}: " if where.startswith(":") else f"{where}: "), problem
    assert message in problem, problem


@pytest.mark.slow
def test_plan_and_inspect_measure_the_head_of_the_stream(tmp_path):
    path = recipe(tmp_path)
    planned = cli("plan", path)
    assert planned.returncode == 0, planned.stderr
    assert "chat.jsonl: messages (column 'messages' found), streamed; tokens per row (the first 240 rows of the " \
           "stream): p50" in planned.stdout
    assert "steps: 20 in total (train.max_steps; a stream has no epochs to count)" in planned.stdout
    inspected = cli("data", "inspect", path)
    assert inspected.returncode == 0, inspected.stderr
    assert "messages (column 'messages' found), streamed" in inspected.stdout
    assert "[[" in inspected.stdout  # trained tokens are marked in the sample, as without streaming


@pytest.mark.slow
def test_a_resumed_stream_continues_with_the_rows_it_would_have_seen(tmp_path):
    # 40 steps of 8 rows over 240 rows: the stream runs out and starts again after step 30.
    sets = ["train.max_steps=40", "train.save_strategy=steps", "train.save_steps=20", "train.logging_steps=1"]
    path = recipe(tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(resolve(path, sets), ["llmtune", "sft"], output_dir=str(whole))
    run(resolve(path, sets), ["llmtune", "sft"], output_dir=str(resumed), resume=str(whole / "checkpoint-20"))

    def losses(folder):
        return {m["step"]: m["loss"] for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "loss" in m}

    after = {step: loss for step, loss in losses(whole).items() if step > 20}
    assert sorted(after) == list(range(21, 41))
    assert {step: losses(resumed)[step] for step in after} == pytest.approx(after, abs=1e-6)


def test_a_stray_row_of_another_format_is_refused_as_without_streaming(tmp_path):
    rows = chat_rows()
    rows[5] = {"prompt": "2+2=", "completion": "4"}
    data = {"train": [{"path": str(write_jsonl(tmp_path / "d.jsonl", rows))}], "eval": None, "streaming": True}
    problems = []
    for streaming in (True, False):
        with pytest.raises(UserError) as refused:
            load_data({**data, "streaming": streaming}, method="sft", seed=0)
        problems.append(refused.value.problems)
    assert problems[0] == problems[1] == [
        f"{tmp_path}/d.jsonl:6: this row's columns ('prompt', 'completion') make it prompt_completion data, but "
        f"{tmp_path}/d.jsonl holds messages rows ({len(rows) - 1} of the {len(rows)} rows read, the first at "
        f"{tmp_path}/d.jsonl:1); one source holds one format: move the prompt_completion rows into a file of their "
        "own (a `data.train` entry of its own), or set `format: messages` on this source (with `columns: {old: new}` "
        "to rename) to read every row as messages"]
    # Past the head, the row is refused when the stream reaches it.
    late = [rows[0]] * CHECK_ROWS + [rows[5]]
    train = load_data({**data, "train": [{"path": str(write_jsonl(tmp_path / "late.jsonl", late))}]}, method="sft",
                      seed=0).train
    with pytest.raises(UserError) as refused:
        list(train)
    assert refused.value.problems == [
        f"{tmp_path}/late.jsonl:{CHECK_ROWS + 1}: this row's columns ('prompt', 'completion') make it "
        f"prompt_completion data, but {tmp_path}/late.jsonl holds messages rows (the rows before it); one source holds "
        "one format: move the prompt_completion rows into a file of their own (a `data.train` entry of its own), or "
        "set `format: messages` on this source (with `columns: {old: new}` to rename) to read every row as messages "
        "(found while streaming)"]
    # `format:` reads every row as that format: a later row's other columns are not its own format.
    pairs = [{"prompt": "a", "completion": "b"}] * CHECK_ROWS + [{"prompt": "c", "completion": "d", "label": True}]
    forced = {"path": str(write_jsonl(tmp_path / "pc.jsonl", pairs)), "format": "prompt_completion"}
    streamed = list(load_data({**data, "train": [forced]}, method="sft", seed=0).train)
    assert len(streamed) == CHECK_ROWS + 1 and {"prompt": "c", "completion": "d"} in streamed


def test_rows_after_the_head_go_through_the_chat_template_checks_of_the_head(tmp_path, tmp_path_factory):
    """As whole data's rows: a system message is folded where the template has no system role (Gemma 2), and a
    role sequence the template refuses stops the run at its row."""
    from .families import family_model

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    system = {"messages": [{"role": "system", "content": "Be brief."}, *chat["messages"]]}
    rows = [chat] * CHECK_ROWS + [system]
    gemma = {"name": str(family_model(tmp_path_factory, "gemma2")), "trust_remote_code": False}
    data = {"train": [{"path": str(write_jsonl(tmp_path / "d.jsonl", rows))}], "streaming": True}
    streamed = list(load_data(data, method="sft", seed=0, model=gemma).train)
    assert len(streamed) == len(rows) and all(row["messages"][0]["role"] == "user" for row in streamed)
    assert sum(row["messages"][0]["content"].startswith("Be brief.\n\n") for row in streamed) == 1
    # A template that refuses two user turns in a row: the row after the head stops the stream, named.
    alternate = {"name": "builtin:tiny", "trust_remote_code": False,
                 "chat_template": str(ROOT / "tests" / "data" / "bad" / "data" / "alternate.jinja")}
    rows[-1] = {"messages": [{"role": "user", "content": "s"}, *chat["messages"]]}
    data["train"] = [{"path": str(write_jsonl(tmp_path / "late.jsonl", rows))}]
    train = load_data(data, method="sft", seed=0, model=alternate).train
    with pytest.raises(UserError) as refused:
        list(train)
    assert refused.value.problems[0].startswith(
        f"{tmp_path}/late.jsonl:{CHECK_ROWS + 1}: the chat template of 'builtin:tiny' refuses this conversation (roles "
        "user, user, assistant): Conversation roles must alternate")
    assert refused.value.problems[0].endswith("(found while streaming)")


@pytest.mark.parametrize("case", ["tool calls", "uncuttable"])
def test_tool_calls_and_uncuttable_conversations_after_the_head_stop_the_stream_at_their_row(tmp_path,
                                                                                             tmp_path_factory, case):
    """Whole data's other row checks, past the head: tool calls the template does not render (Llama 3's), and a
    conversation it cannot cut into turns where assistant-only loss renders each turn (here a template that
    rewrites earlier answers; the head's conversations have one turn each)."""
    from .families import family_model

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    if case == "tool calls":
        model = {"name": str(family_model(tmp_path_factory, "llama3")), "trust_remote_code": False}
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
        late = [chat[0], call, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
        problem = "a tool-calling row, but the model's chat template has no tool support: it drops the tool calls " \
            "of messages[1] ('get_weather' not rendered)"
    else:
        template = tmp_path / "rewrites.jinja"
        template.write_text("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}(earlier)"
                            "{% else %}{{ m.role }}: {{ m.content }}{% endif %}\n{% endfor %}")
        model = {"name": "builtin:tiny", "trust_remote_code": False, "chat_template": str(template)}
        late = chat + chat
        problem = "the chat template renders assistant turn 1 differently once later turns follow"
    data = {"train": [{"path": str(write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}] * CHECK_ROWS +
                                               [{"messages": late}]))}], "streaming": True}
    train = load_data(data, method="sft", seed=0, model=model).train
    with pytest.raises(UserError) as refused:
        list(train)
    [message] = refused.value.problems
    assert message.startswith(f"{tmp_path}/d.jsonl:{CHECK_ROWS + 1}: {problem}"), message
    assert message.endswith("(found while streaming)")


def test_a_bad_row_reached_while_streaming_is_explained_with_what_to_run_next(tmp_path):
    """No checkpoint yet: the directory holds a failed run, so running again needs `--overwrite`; after one: resume
    from it, forced, since the fixed file's hash is not the one the checkpoint recorded (test_reliability.py)."""
    from llmtune.runner.diagnose import explain
    from llmtune.runner.session import TrainingFailed

    err = StreamedRowError(f"d.jsonl:{CHECK_ROWS + 1}: unknown role 'robot'")
    assert str(TrainingFailed(None, err)) == f"d.jsonl:{CHECK_ROWS + 1}: unknown role 'robot' (found while streaming)"
    assert explain(UserError("reward_funcs: cannot import module 'r'"), tmp_path, None, None) is None  # not a row
    assert explain(err, tmp_path, None, None) == \
        "Fix the row, or leave it out, and run again with `--overwrite` (no checkpoint had been completed)."
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert explain(err, tmp_path, None, None) == (
        f"Fix the row, or leave it out, and continue from the last complete checkpoint, {tmp_path / 'checkpoint-4'}, "
        "with the same command plus `--resume auto --resume-force` (the edited file's hash differs from the recorded "
        "one).")


LONG = "word " * 300  # over 128 tokens with builtin:tiny's byte tokenizer


def test_a_stream_whose_checked_rows_are_all_cut_at_max_length_is_refused_before_the_model_loads(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": LONG + str(i)}, {"role": "assistant", "content": "ok"}]}
            for i in range(30)]
    path = recipe(tmp_path, data=write_jsonl(tmp_path / "long.jsonl", rows))
    refusal = ("error: r.yaml:7:3: the prompt of each of the first 30 rows (those checked before streaming) fills "
               f"`data.max_length: 128` tokens, so nothing would be trained (the first: {tmp_path}/long.jsonl:1); "
               "raise `data.max_length` or shorten the prompts")
    for verb in ("validate", "sft", "plan"):
        result = CliRunner().invoke(app, [verb, str(path), *(["--output-dir", "run"] if verb == "sft" else [])])
        assert (result.exit_code, result.stderr.strip()) == (2, refusal), (verb, result.stderr, result.exception)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_trainer_drops_the_rows_cut_at_max_length_as_they_stream(tmp_path):
    """What the warning says of streamed rows whose prompt fills `data.max_length`: none reaches a batch (TRL's
    SFT trainer drops fully masked rows from the stream), and every other row does."""
    rows = chat_rows()
    cut = [{"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]}] * 5
    trainer = built_trainer(tmp_path, "sft", rows + cut, "builtin:tiny", data={"streaming": True, "max_length": 128},
                            train={"max_steps": 2})
    streamed = list(trainer.train_dataset)
    assert len(streamed) == len(rows) and all(any(label != -100 for label in row["labels"]) for row in streamed)


@pytest.mark.slow
def test_rows_cut_at_max_length_are_counted_by_validate_plan_and_the_stream_run(tmp_path):
    rows = chat_rows()
    for i in (3, 10, 17):
        rows[i] = {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    path = recipe(tmp_path, data=data)
    warning = (f"warning: 3 of the first {len(rows)} rows of {data} (those checked before streaming) have a prompt of "
               "`data.max_length: 128` tokens or more, so nothing of them would be trained; the trainer drops them, and "
               f"rows like them further on, as they stream (the first: {data}:4). Raise `data.max_length` or "
               "shorten the prompts")
    validated = cli("validate", path)
    assert validated.returncode == 0 and warning in validated.stderr.splitlines(), validated.stderr
    planned = cli("plan", path)
    assert planned.returncode == 0 and warning in planned.stdout.splitlines(), planned.stdout
    run(resolve(path, ["train.max_steps=2"]), ["llmtune", "sft"], output_dir=str(tmp_path / "run"))
    assert warning.removeprefix("warning: ") in (tmp_path / "run" / "train.log").read_text()
    # Without streaming the same rows are left out and the rows used counted, by plan too.
    whole = cli("plan", path, "--set", "data.streaming=false")
    assert (f"warning: 3 of {len(rows)} rows of {data} have a prompt of `data.max_length: 128` tokens or more, so "
            f"nothing of them would be trained; they are left out (the first: {data}:4)") in whole.stdout, whole.stdout
