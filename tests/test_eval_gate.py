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
    # Every score is a metrics.jsonl row too (before at step 0, step 2, the end at step 3), for the plots.
    rows = [json.loads(line) for line in (bad / "metrics.jsonl").read_text().splitlines()]
    scored = [(row["step"], row[f"gate/{TASK}/acc"]) for row in rows if f"gate/{TASK}/acc" in row]
    assert scored == [(0, drop["before"]), (2, bad_gate["steps"][0]["scores"][TASK]["acc"]), (3, drop["after"])]

    card = (bad / "README.md").read_text()
    assert "Verdict: **flagged** (tolerance 0.05)" in card and f"| {TASK} | acc |" in card
    shown = io.StringIO()
    summarize(bad, bad_metrics, shown)
    assert "eval gate: FLAGGED: llmtune_chat_mc acc fell by" in shown.getvalue()
    lines, _ = compare([bad, good], tmp_path / "cmp.png")
    assert lines[-1].endswith(", lm-eval tasks (eval:))")  # a panel of the tasks' scores per step
    row = next(line for line in lines if line.strip().startswith(f"eval {TASK}"))
    assert f"{drop['after']:.4g}" in row and "eval gate" in "\n".join(lines)
    assert next(line for line in lines if "eval gate" in line).split()[-2:] == ["flagged", "passed"]


@pytest.mark.slow  # a short run on the base, scored at each of its 4 evaluations
def test_keep_best_ends_the_run_on_the_checkpoint_with_the_best_task_score(tmp_path, base_run):
    from safetensors.torch import load_file

    recipe = make_recipe(tmp_path, name="best", model={"name": str(base_run)}, data={"max_length": 256, "eval": 0.1},
                         train={"learning_rate": 3e-3, "max_steps": 4, "per_device_train_batch_size": 8,
                                "logging_steps": 1, "eval_steps": 1, "disable_tqdm": True},
                         eval={"tasks": ["eval/chat-mc"], "keep_best": f"{TASK}/acc"})
    out = tmp_path / "best"
    train(resolve(recipe), ["llmtune", "sft"], output_dir=str(out))
    gate = json.loads((out / "manifest.json").read_text())["eval_gate"]
    scores = {s["step"]: s["scores"][TASK]["acc"] for s in gate["steps"]}
    # Measured: 0.528 after step 1, then 0.5 (this learning rate makes the base forget a little more each step).
    assert list(scores) == [1, 2, 3, 4] and scores[1] > max(scores[2], scores[3], scores[4]), scores
    best = json.loads((out / "manifest.json").read_text())["best_checkpoint"]
    assert best == {"step": 1, "metric": f"gate/{TASK}/acc", "value": scores[1]}
    assert gate["after"][TASK]["acc"] == scores[1]  # the model the run ends with is step 1's
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (out / "checkpoint-1").glob("*.safetensors"))
    for name in weights:
        final, kept = load_file(out / name), load_file(out / "checkpoint-1" / name)
        assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)


@pytest.mark.parametrize("section, train, message", [
    ({"keep_best": "acc"}, {}, r"r\.yaml:\d+:\d+: `eval.keep_best` is `TASK/METRIC` as lm-eval reports them"),
    ({"keep_best": f"{TASK}/acc", "every_n_steps": 2}, {},
     r"r\.yaml:\d+:\d+: `eval.keep_best` scores the tasks at every evaluation \(`train.eval_steps`\): remove"),
    ({"keep_best": f"{TASK}/acc"}, {"metric_for_best_model": "eval_loss"},
     r"r\.yaml:\d+:\d+: `eval.keep_best` sets `train.metric_for_best_model`: remove it"),
    ({"tasks": [], "keep_best": f"{TASK}/acc"}, {},
     r"r\.yaml:\d+:\d+: `eval.keep_best` names a task of `eval.tasks`, and none is scored"),
    ({"keep_best": f"{TASK}/acc"}, {"save_strategy": "no"},
     r"r\.yaml:\d+:\d+: `eval.keep_best` loads the best checkpoint, so checkpoints are saved when evaluating"),
])
def test_bad_keep_best_is_refused_at_its_line(tmp_path, section, train, message):
    recipe = make_recipe(tmp_path, data={"eval": 0.1}, train=train, eval={"tasks": ["eval/chat-mc"], **section})
    with pytest.raises(UserError, match=message):
        resolve(recipe)


def test_keep_best_without_an_eval_set_or_naming_no_task_is_refused(tmp_path):
    from llmtune.runner import preflight

    with pytest.raises(UserError, match=r"`eval.keep_best` scores the tasks at every evaluation of the eval set, "
                       r"and there is none: add `data.eval: 0.05`"):
        resolve(make_recipe(tmp_path, eval={"tasks": ["eval/chat-mc"], "keep_best": f"{TASK}/acc"}))
    for keep, message in (("chat_mc/acc", f"no task chat_mc among the tasks scored ({TASK})"),
                          (f"{TASK}/f1", f"{TASK} reports acc, acc_norm, not f1")):
        recipe = make_recipe(tmp_path, data={"eval": 0.1}, eval={"tasks": ["eval/chat-mc"], "keep_best": keep})
        with pytest.raises(UserError) as err:
            preflight.model(resolve(recipe))  # what `validate` and every training verb run first
        (problem,) = err.value.problems
        assert problem.startswith(f"{tmp_path / 'r.yaml'}:") and message in problem
