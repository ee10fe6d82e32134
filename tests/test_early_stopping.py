"""`early_stopping:`: evaluation during training stops the run when the eval loss rises, and ends on the best."""

import json

import pytest
from safetensors.torch import load_file

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run
from llmtune.runner.trainer_args import training_args

from .conftest import make_recipe, write_jsonl

TRAIN = {"learning_rate": 1.0e-2, "max_steps": 40, "per_device_train_batch_size": 8, "gradient_checkpointing": False,
         "logging_steps": 2, "eval_steps": 2, "disable_tqdm": True}
STOPPING = {"patience": 2}


def recipe(tmp_path, eval_=({"path": "eval.jsonl"},), train=(), stopping=STOPPING):
    # Train on one pattern, evaluate on another: the more the model learns, the worse the eval loss.
    write_jsonl(tmp_path / "train.jsonl", [{"text": "ab" * 20}] * 64)
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "xy" * 20}] * 8)
    return make_recipe(tmp_path, data={"train": [{"path": "train.jsonl"}], "eval": eval_, "max_length": 64},
                       adapter={"type": "lora", "r": 8, "alpha": 16}, train={**TRAIN, **dict(train)},
                       early_stopping=stopping)


@pytest.mark.slow
def test_stops_when_eval_loss_rises_and_ends_on_the_best_checkpoint(tmp_path):
    out = tmp_path / "run"
    metrics = run(resolve(recipe(tmp_path)), ["llmtune", "sft"], output_dir=str(out))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(m["step"], m["eval_loss"]) for m in logged if "eval_loss" in m]
    # Evaluated every 2 steps; the first evaluation stays the best, so patience 2 stops at step 2 + 2 x 2.
    assert [step for step, _ in evals][:3] == [2, 4, 6], evals
    assert evals[0][1] < min(loss for _, loss in evals[1:3])
    assert max(m["step"] for m in logged) == 6, "training did not stop early"
    # The best checkpoint is kept (transformers drops the others at the end: save_total_limit 1), and it is
    # what the run directory ends with.
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith("checkpoint-2") and state["best_global_step"] == 2
    assert metrics["eval_loss"] == pytest.approx(evals[0][1], rel=1e-4)
    final, best = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-2" /
                                                                          "adapter_model.safetensors")
    assert final.keys() == best.keys() and all((final[k] == best[k]).all() for k in final)
    assert (out / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_load_best_model_at_end_in_train_keeps_the_best_checkpoint_and_the_manifest_names_it(tmp_path):
    out = tmp_path / "run"
    best = {"max_steps": 6, "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "save_steps": 2}
    run(resolve(recipe(tmp_path, train=best, stopping=None)), ["llmtune", "sft"], output_dir=str(out))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(m["step"], m["eval_loss"]) for m in logged if "eval_loss" in m]
    # Evaluated at steps 2, 4 and 6, rising after step 2; then once more on the model the run ends with.
    assert [step for step, _ in evals] == [2, 4, 6, 6] and evals[0][1] < min(evals[1][1], evals[2][1]), evals
    assert evals[-1][1] == pytest.approx(evals[0][1], rel=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["best_checkpoint"] == {"step": 2, "metric": "eval_loss", "value": pytest.approx(evals[0][1])}
    final, kept = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-2" /
                                                                          "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)


def test_section_sets_the_trainer_arguments_and_train_wins(tmp_path):
    resolved = resolve(recipe(tmp_path, train={"save_total_limit": 3}))
    args = training_args(resolved, tmp_path / "out", {"eval_strategy": "steps"})
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert (args.save_strategy, args.save_steps, args.save_total_limit) == ("steps", 2, 3)


@pytest.mark.parametrize("eval_, train, stopping, message", [
    (None, {}, STOPPING, r"r\.yaml:\d+:\d+: early stopping watches an eval metric, and there is no eval set"),
    (0.1, {"save_strategy": "no"}, STOPPING, r"r\.yaml:\d+:\d+: early stopping loads the best checkpoint.*"
                                                r"remove `train.save_strategy`"),
    (0.1, {"save_steps": 3}, STOPPING, r"`train.save_steps: 3` must be a multiple of `train.eval_steps: 2`"),
    (0.1, {"eval_strategy": "no"}, STOPPING, r"early stopping needs evaluations"),
    (0.1, {}, {"patience": 0}, r"`early_stopping.patience` must be >= 1"),
    (0.1, {}, {"patiense": 2}, r"unknown key 'patiense' in early_stopping \(did you mean 'patience'"),
])
def test_bad_combinations_are_refused_before_a_model_loads(tmp_path, eval_, train, stopping, message):
    with pytest.raises(UserError, match=message):
        resolve(recipe(tmp_path, eval_=eval_, train=train, stopping=stopping))
