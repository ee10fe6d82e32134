"""`llmtune eval`: lm-evaluation-harness on a run directory, offline, its score checked against one computed by hand."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run
from llmtune.tools.export import merge
from llmtune.tools.infer import load

from .conftest import RECIPES, cli

pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'llmtune-recipes[eval]'")
pytestmark = pytest.mark.slow  # every test here scores a trained run

TASK = RECIPES / "eval" / "chat-mc.yaml"
ROWS = [json.loads(line) for line in (RECIPES / "eval" / "chat-mc.jsonl").read_text().splitlines()]
# Any connection attempt fails loudly: a local task must not reach the network (not even datasets' download
# counter, which pings S3 unless offline mode is on).
NO_NETWORK = """\
import socket

def refuse(*args, **kwargs):
    raise OSError(f"network access in an offline test: {args}")

socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
"""


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, llmtune_cache):
    """The README's quickstart run (a few seconds of training)."""
    out = tmp_path_factory.mktemp("eval") / "quickstart"
    run(resolve(RECIPES / "quickstart.yaml"), ["llmtune", "sft", "recipes/quickstart.yaml"], output_dir=str(out))
    return out


def by_hand(model, tokenizer, rows=ROWS) -> dict:
    """acc and acc_norm as lm-eval defines them, from log-likelihoods computed with the model directly."""
    hits = {"acc": 0, "acc_norm": 0}
    for row in rows:
        system = [{"role": "system", "content": row["system"]}] if row["system"] else []
        prompt = tokenizer.apply_chat_template([*system, {"role": "user", "content": row["question"]}],
                                               add_generation_prompt=True, tokenize=False)
        # lm-eval moves the prompt's trailing whitespace (the newline after <|assistant|>) into the continuation.
        context = tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        hits["acc"] += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
        per_char = [s / len(c) for s, c in zip(scores, row["choices"])]
        hits["acc_norm"] += max(range(len(scores)), key=per_char.__getitem__) == row["answer"]
    return {k: v / len(rows) for k, v in hits.items()}


@pytest.fixture(scope="module")
def expected(quickstart):
    loaded = load(quickstart)
    return by_hand(loaded.model, loaded.tokenizer)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def offline_cli(tmp_path, *args):
    """The CLI with every socket refused and without the test suite's HF_HUB_OFFLINE: llmtune must go offline."""
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    # Outside a git repository, where lm-eval's `git describe` would complain.
    return cli(*args, cwd=tmp_path, env={"PYTHONPATH": path, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})


def test_eval_scores_the_shipped_task_as_computed_by_hand(quickstart, expected, tmp_path):
    before = json.loads((quickstart / "manifest.json").read_text())
    result = offline_cli(tmp_path, "eval", quickstart, "--tasks", TASK)
    assert result.returncode == 0, result.stderr
    assert "chat template: applied (the run trained on conversations)" in result.stdout
    assert "|llmtune_chat_mc|" in result.stdout and f"wrote {quickstart / 'eval' / 'llmtune_chat_mc.json'}" \
        in result.stdout
    assert "network access" not in result.stderr and "fatal:" not in result.stderr

    saved = json.loads((quickstart / "eval" / "llmtune_chat_mc.json").read_text())
    scores = saved["results"]["llmtune_chat_mc"]
    assert scores["acc,none"] == pytest.approx(expected["acc"], abs=1e-9)
    assert scores["acc_norm,none"] == pytest.approx(expected["acc_norm"], abs=1e-9)
    assert saved["n-samples"]["llmtune_chat_mc"]["effective"] == len(ROWS) and saved["chat_template"] is True
    assert "pretty_env_info" not in saved and "chat_template" not in saved["config"]

    manifest = json.loads((quickstart / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "evals"} == before  # the run's own record is untouched
    entry = manifest["evals"][-1]
    assert entry["file"] == "eval/llmtune_chat_mc.json" and entry["tasks"] == ["llmtune_chat_mc"]
    assert entry["metrics"]["llmtune_chat_mc"]["acc"] == scores["acc,none"] and entry["limit"] is None
    assert entry["lm_eval"] == __import__("lm_eval").__version__

    # The quickstart learned something the task measures: the untrained base scores lower (chance is 0.25).
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path

    base = by_hand(AutoModelForCausalLM.from_pretrained(builtin_path("tiny")), load(quickstart).tokenizer)
    assert scores["acc,none"] > base["acc"] + 0.15


def test_eval_of_the_merged_model_scores_what_the_adapter_scores(quickstart):
    merged, _ = merge(quickstart, quickstart.parent / "merged")
    result = cli("eval", merged, "--tasks", "eval/chat-mc", "--limit", "12", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    # merge's manifest points at the trained run, whose data was conversational
    assert "chat template: applied (the run trained on conversations)" in result.stdout
    entry = json.loads((merged / "manifest.json").read_text())["evals"][-1]
    assert entry["limit"] == 12 and entry["metrics"]["llmtune_chat_mc"]["sample_len"] == 12
    adapter = load(quickstart)
    expected = by_hand(adapter.model, adapter.tokenizer, ROWS[:12])  # --limit takes the first rows
    assert {k: entry["metrics"]["llmtune_chat_mc"][k] for k in expected} == pytest.approx(expected, abs=1e-9)


def test_bad_input_exits_2_with_one_message_and_writes_nothing(quickstart, tmp_path):
    before = snapshot(quickstart)
    (tmp_path / "notes").mkdir()
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "config.json").write_text("{}")
    (reward / "recipe.yaml").write_text("method: reward\n")
    no_data = tmp_path / "no-data.yaml"
    no_data.write_text(TASK.read_text().replace("chat-mc.jsonl", "gone.jsonl"))
    cases = {
        ("eval", quickstart, "--tasks", "hellaswagg"):
            "--tasks hellaswagg: unknown lm-eval task (did you mean hellaswag",
        ("eval", quickstart, "--tasks", no_data): "gone.jsonl",
        ("eval", quickstart, "--tasks", "missing.yaml"): "--tasks missing.yaml: no such task file",
        ("eval", quickstart, "--tasks", RECIPES / "quickstart.yaml"): "not an lm-eval task file",
        ("eval", quickstart, "--tasks", TASK, "--limit", "0"): "--limit 0: give a number of rows",
        ("eval", tmp_path / "nope", "--tasks", TASK): "nope: no such run directory",
        ("eval", tmp_path / "notes", "--tasks", TASK): "notes: not a run directory",
        ("eval", reward, "--tasks", TASK): "a reward model scores whole texts",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(quickstart) == before and not any((tmp_path / "notes").iterdir())


def test_without_lm_eval_the_message_names_the_extra(quickstart):
    code = ("import sys; sys.modules['lm_eval'] = None; from llmtune.cli import main; "
            f"sys.argv = ['llmtune', 'eval', {str(quickstart)!r}, '--tasks', {str(TASK)!r}]; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert 'pip install "llmtune-recipes[eval]"' in result.stderr and "Traceback" not in result.stderr
