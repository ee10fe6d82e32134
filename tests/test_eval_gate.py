"""The recipe's `eval:` gate: lm-eval tasks scored before and after training, the change per task, and a verdict
that flags a destructive run (catastrophic forgetting) and passes a normal one."""

import io
import json
import shutil

import pytest

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner.gate import judge
from llmtune.runner.rundir import summarize
from llmtune.runner.session import train
from llmtune.tools.runs import compare

from .conftest import RECIPES, make_recipe

TASK = "llmtune_chat_mc"  # recipes/eval/chat-mc.yaml, the shipped offline task


def gate_record(before, after, tolerance=None, targets=None, metric=None, higher=True):
    return {"before": {TASK: before}, "after": {TASK: after}, "tolerance": tolerance, "targets": targets or {},
            "metric": metric, "higher_is_better": {TASK: {k: higher for k in after}}}


def test_the_verdict_flags_a_drop_beyond_the_tolerance_and_a_missed_target():
    passed = judge(gate_record({"acc": 0.5, "acc_norm": 0.4}, {"acc": 0.47, "acc_norm": 0.1}, tolerance=0.05))
    assert passed["verdict"] == "passed" and passed["reasons"] == []  # judged on acc, the first metric
    assert passed["change"][TASK]["change"] == pytest.approx(-0.03)
    dropped = judge(gate_record({"acc": 0.5}, {"acc": 0.25}, tolerance=0.05, targets={TASK: 0.4}))
    assert dropped["verdict"] == "flagged"
    assert dropped["reasons"] == [f"{TASK} acc fell by 0.25 (0.5 -> 0.25), more than the tolerance 0.05",
                                  f"{TASK} acc 0.25 missed its target 0.4"]
    # Lower is better (a perplexity): rising is the drop.
    worse = judge(gate_record({"ppl": 10.0}, {"ppl": 12.0}, tolerance=1.0, higher=False))
    assert worse["reasons"] == [f"{TASK} ppl rose by 2 (10 -> 12), more than the tolerance 1"]
    missing = judge(gate_record({"acc": 0.5}, {"acc": 0.5}, metric="f1"))
    assert missing["verdict"] == "flagged" and "reports no `f1` (it reports acc)" in missing["reasons"][0]


def test_bad_eval_sections_are_refused_at_their_line(tmp_path):
    recipe = make_recipe(tmp_path, eval={"tasks": ["eval/chat-mc", "tasks/missing.yaml"], "tolerance": -0.1,
                                         "every_n_steps": 0, "limit": 0}, launch={"num_processes": 2})
    with pytest.raises(UserError) as err:
        resolve(recipe)
    text = "\n".join(err.value.problems)
    assert "r.yaml:" in text
    assert "no such task file 'tasks/missing.yaml' (relative paths are read from the recipe's folder)" in text
    assert "`eval.tolerance` is how far a task may get worse, >= 0 (e.g. 0.02); got -0.1" in text
    assert "`eval.every_n_steps` must be >= 1; got 0" in text and "`eval.limit` is a number of rows" in text
    assert "`eval:` scores the model in one process, and this recipe launches several" in text
    reward = make_recipe(tmp_path, "reward", data=RECIPES / "data" / "preference.jsonl", eval={"tasks": ["x"]})
    with pytest.raises(UserError, match="lm-eval tasks need a language model: remove `eval:`"):
        resolve(reward)


def test_task_files_are_read_from_the_recipe_folder(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("chat-mc.yaml", "chat-mc.jsonl"):
        shutil.copy(RECIPES / "eval" / name, tasks / name)
    config = resolve(make_recipe(tmp_path, eval={"tasks": ["tasks/chat-mc.yaml", "eval/chat-mc"]})).config
    assert config["eval"]["tasks"] == [str(tasks / "chat-mc.yaml"), "eval/chat-mc"]
    assert config["eval"]["tolerance"] is None and config["eval"]["targets"] == {}


def test_validate_refuses_a_target_naming_no_task_scored(tmp_path):
    from llmtune.runner import preflight

    recipe = make_recipe(tmp_path, eval={"tasks": ["eval/chat-mc"], "targets": {"chat_mc": 0.5}})
    with pytest.raises(UserError) as err:
        preflight.model(resolve(recipe))  # what `validate` and every training verb run first
    (problem,) = err.value.problems
    assert problem.startswith(f"{tmp_path / 'r.yaml'}:")  # the `eval:` line
    assert f"`eval.targets`: no task chat_mc among the tasks scored ({TASK})" in problem


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, llmtune_cache):
    """The quickstart run: the starting model, which has learned the sample chat data (acc 0.556 on chat-mc)."""
    out = tmp_path_factory.mktemp("gate") / "quickstart"
    train(resolve(RECIPES / "quickstart.yaml"), ["llmtune", "sft"], output_dir=str(out))
    return out


def gated(folder, base_run, name, learning_rate, **eval_section):
    recipe = make_recipe(folder, name=name, model={"name": str(base_run)}, data={"max_length": 256},
                         train={"learning_rate": learning_rate, "max_steps": 3, "per_device_train_batch_size": 8,
                                "save_strategy": "no", "logging_steps": 1},
                         eval={"tasks": ["eval/chat-mc"], **eval_section})
    out = folder / name
    metrics = train(resolve(recipe), ["llmtune", "sft"], output_dir=str(out))
    return out, metrics


@pytest.mark.slow  # trains the base and two short runs on it, scoring each before and after
def test_a_destructive_run_is_flagged_and_a_normal_one_is_not(tmp_path, base_run):
    from llmtune.tools.infer import load

    from .test_eval import by_hand

    loaded = load(base_run)
    expected = by_hand(loaded.model, loaded.tokenizer)

    bad, bad_metrics = gated(tmp_path, base_run, "destructive", 1.0, tolerance=0.05, every_n_steps=2)
    good, _ = gated(tmp_path, base_run, "normal", 1e-5, tolerance=0.05, targets={TASK: 0.5})

    bad_gate = json.loads((bad / "manifest.json").read_text())["eval_gate"]
    good_gate = json.loads((good / "manifest.json").read_text())["eval_gate"]
    # "before" is the starting model's score, as computed by hand from its log-likelihoods.
    for gate in (bad_gate, good_gate):
        assert gate["before"][TASK] == pytest.approx(expected)
        assert gate["chat_template"] is True  # conversational data, a tokenizer with a template
    assert [s["step"] for s in bad_gate["steps"]] == [2] and good_gate["steps"] == []
    drop = bad_gate["change"][TASK]
    assert drop["metric"] == "acc" and drop["before"] - drop["after"] > 0.05
    assert bad_gate["verdict"] == "flagged" and "more than the tolerance 0.05" in bad_gate["reasons"][0]
    assert good_gate["verdict"] == "passed" and abs(good_gate["change"][TASK]["change"]) <= 0.05
    assert json.loads((bad / "eval" / "gate.json").read_text()) == bad_gate

    card = (bad / "README.md").read_text()
    assert "Verdict: **flagged** (tolerance 0.05)" in card and f"| {TASK} | acc |" in card
    shown = io.StringIO()
    summarize(bad, bad_metrics, shown)
    assert "eval gate: FLAGGED: llmtune_chat_mc acc fell by" in shown.getvalue()
    lines, _ = compare([bad, good], tmp_path / "cmp.png")
    row = next(line for line in lines if line.strip().startswith(f"eval {TASK}"))
    assert f"{drop['after']:.4g}" in row and "eval gate" in "\n".join(lines)
    assert next(line for line in lines if "eval gate" in line).split()[-2:] == ["flagged", "passed"]
