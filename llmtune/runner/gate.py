"""Evaluations that gate a run (the recipe's `eval:`): lm-eval tasks scored on the starting model before training,
every N steps if asked, and on the result after; the change per task and a verdict.

The run is flagged, not stopped: a task that got worse by more than `tolerance` (catastrophic forgetting) or
ended short of its target is named in the verdict, which goes to the manifest (`eval_gate`), RUN_DIR/eval/gate.json,
the card, the summary and `llmtune compare`. Scoring uses the trainer's own model in this process, so nothing is
loaded twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

from ..errors import UserError
from ..files import write_json
from ..ranks import is_main_process
from ..recipe.schema import ADAPTERS
from .lmeval import import_lm_eval, load_tasks, metrics, parse_tasks, score

FILE = Path("eval") / "gate.json"


def tasks(config: dict):
    """(lm_eval, its loaded tasks) for the recipe's `eval:`; UserError for a task, a target or a `keep_best` it
    cannot score. The pre-flight calls it too, so `validate` refuses what the run would."""
    spec = config["eval"]
    specs = parse_tasks(",".join(spec["tasks"]), label="`eval.tasks`")
    lm_eval = import_lm_eval(specs, "the recipe's `eval:`")
    loaded = load_tasks(specs)
    unknown = sorted(set(spec["targets"]) - set(loaded[1]))
    if unknown:
        raise UserError(f"`eval.targets`: no task {', '.join(unknown)} among the tasks scored "
                        f"({', '.join(loaded[1])}); name targets by task as lm-eval reports it")
    if spec["keep_best"]:
        _check_keep_best(spec["keep_best"], loaded[1], config["train"])
    return lm_eval, loaded


def _check_keep_best(keep: str, loaded: dict, train: dict) -> None:
    from lm_eval.api.group import Group

    task, _, metric = keep.partition("/")
    if task not in loaded:
        raise UserError(f"`eval.keep_best: {keep}`: no task {task} among the tasks scored ({', '.join(loaded)}); "
                        "write `TASK/METRIC` with the task as lm-eval reports it")
    if isinstance(loaded[task], Group):
        return  # a group's metrics are its members' aggregated, known once scored
    higher = loaded[task].higher_is_better()
    if metric not in higher:
        raise UserError(f"`eval.keep_best: {keep}`: {task} reports {', '.join(higher)}, not {metric}")
    if higher[metric] is False and train.get("greater_is_better") is not False:
        raise UserError(f"`eval.keep_best: {keep}`: lower {metric} is better, and the trainer would keep the "
                        "highest: add `train.greater_is_better: false`")


def flat(scores: dict) -> dict:
    """{task: {metric: value}} under the names metrics.jsonl logs them by, `gate/TASK/METRIC` (what the plot draws
    and `eval.keep_best` names)."""
    return {f"gate/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()}


class Gate:
    """The tasks, loaded before training (a bad one is refused before anything is written), and the scores."""

    def __init__(self, config: dict, tokenizer, data_shape: str):
        self.spec = config["eval"]
        self.tokenizer = tokenizer
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("`eval:` scores the model in one process, and this run has several; remove `eval:` and "
                            "score the finished run with `llmtune eval`, or train in one process")
        self.lm_eval, self.tasks = tasks(config)
        # A new prompt-learning adapter starts with random virtual tokens, so the starting model is the base without
        # it; a new LoRA starts as the identity, and a run's own adapter (`model.run_adapter: stack`) is the start.
        adapter = config.get("adapter")
        self.fresh_tokens = bool(adapter) and not ADAPTERS[adapter["type"]].mergeable
        chosen = self.spec["chat_template"]
        self.apply = bool(tokenizer.chat_template) and data_shape.startswith("conversational_") if chosen is None \
            else chosen
        if self.apply and not tokenizer.chat_template:
            raise UserError("`eval.chat_template: true`: the tokenizer has no chat template")
        self.record = {"tasks": list(self.tasks[1]), "metric": self.spec["metric"], "tolerance": self.spec["tolerance"],
                       "targets": self.spec["targets"], "limit": self.spec["limit"],
                       "num_fewshot": self.spec["num_fewshot"], "chat_template": self.apply,
                       "lm_eval": self.lm_eval.__version__, "steps": []}

    def score(self, model, starting: bool = False) -> dict:
        """{task: {metric: value}} for `model`; `starting`: the model before its first step."""
        started = time.monotonic()
        training = model.training
        model.eval()
        off = model.disable_adapter if starting and self.fresh_tokens else None
        try:  # lm-eval's progress bars write to the stderr of their creation: kept off the training bar's terminal
            with off() if off else contextlib.nullcontext(), contextlib.redirect_stderr(io.StringIO()):
                results = score(model, self.tokenizer, self.tasks, limit=self.spec["limit"],
                                num_fewshot=self.spec["num_fewshot"], apply_chat_template=self.apply)
        finally:
            model.train(training)
        # The metrics with a direction (lm-eval's higher_is_better), not counts such as sample_len.
        better = self.record.setdefault("higher_is_better", {})
        for task, values in (results.get("higher_is_better") or {}).items():
            better[task] = {k: v for k, v in values.items() if isinstance(v, bool)}
        self.record["seconds"] = round(self.record.get("seconds", 0) + time.monotonic() - started, 1)
        return {task: {k: v for k, v in values.items() if k in better.get(task, {})}
                for task, values in metrics(results).items()}

    def callback(self, run, interruption):
        """The TrainerCallback that scores the model for `run` (a RunDir), unless `interruption` stopped the run
        (a checkpoint is saved and the process exits; the resumed run scores its end). The record goes to
        RUN_DIR/eval/gate.json as it grows, and with the verdict to the manifest; each score to metrics.jsonl."""
        from transformers import TrainerCallback

        gate, run_dir = self, run.path

        def scored(state, model) -> dict:
            scores = gate.score(model)
            gate.record["steps"].append({"step": state.global_step, "scores": scores})
            gate.save(run_dir, state.global_step, scores)
            return scores

        class GateCallback(TrainerCallback):
            training = False  # trainer.evaluate() after training calls on_evaluate too: the end is scored once

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.training = True
                earlier = _read(run_dir / FILE) if state.global_step else {}  # resumed: the starting model's scores
                gate.record["steps"] = [s for s in earlier.get("steps", []) if s["step"] <= state.global_step]
                if earlier.get("before"):  # already in metrics.jsonl too
                    gate.record["before"] = earlier["before"]
                    gate.save(run_dir)
                else:
                    gate.record["before"] = gate.score(model, starting=True)
                    gate.save(run_dir, state.global_step, gate.record["before"])

            def on_step_end(self, args, state, control, model=None, **kwargs):
                every = gate.spec["every_n_steps"]
                if every and state.global_step % every == 0 and state.global_step < state.max_steps:
                    scored(state, model)

            def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
                if gate.spec["keep_best"] and self.training:  # the trainer picks the best checkpoint by these
                    metrics.update({f"eval_{key}": value for key, value in flat(scored(state, model)).items()})

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.training = False
                if interruption.step is not None:
                    return
                gate.record["after"] = gate.score(model)  # the best checkpoint's, when one was loaded
                gate.record.update(judge(gate.record))
                gate.save(run_dir, state.global_step, gate.record["after"])
                run.record(eval_gate=gate.record)

        return GateCallback()

    def save(self, run_dir: Path, step: int | None = None, scores: dict | None = None) -> None:
        """The record to RUN_DIR/eval/gate.json; `scores` (new at `step`) appended to metrics.jsonl."""
        if is_main_process():
            (run_dir / FILE).parent.mkdir(exist_ok=True)
            write_json(run_dir / FILE, self.record)
            if scores is not None:
                with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"step": step, **flat(scores)}) + "\n")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def judge(record: dict) -> dict:
    """The change per task on its judged metric, and the verdict: `passed`, or `flagged` with the reasons."""
    rows, reasons = {}, []
    for task, after in record["after"].items():
        before = record["before"].get(task, {})
        metric = record["metric"] or next(iter(after), None)
        if metric not in after or metric not in before:
            reasons.append(f"{task} reports no `{metric}` (it reports {', '.join(after) or 'nothing'}); set "
                           "`eval.metric`")
            continue
        higher = record.get("higher_is_better", {}).get(task, {}).get(metric, True)
        change = after[metric] - before[metric]
        rows[task] = {"metric": metric, "before": before[metric], "after": after[metric], "change": change,
                      "higher_is_better": higher}
        worse = -change if higher else change
        if record["tolerance"] is not None and worse > record["tolerance"]:
            reasons.append(f"{task} {metric} {'fell' if higher else 'rose'} by {abs(change):.4g} ({before[metric]:.4g}"
                           f" -> {after[metric]:.4g}), more than the tolerance {record['tolerance']:g}")
        target = record["targets"].get(task)
        if target is not None and (after[metric] < target if higher else after[metric] > target):
            reasons.append(f"{task} {metric} {after[metric]:.4g} missed its target {target:g}")
    return {"change": rows, "verdict": "flagged" if reasons else "passed", "reasons": reasons}


def summary(record: dict) -> str:
    """One line for the terminal."""
    if record.get("verdict") == "passed":
        shown = ", ".join(f"{task} {r['metric']} {r['before']:.4g} -> {r['after']:.4g}"
                          for task, r in record["change"].items())
        return f"eval gate: passed ({shown})"
    return "eval gate: FLAGGED: " + "; ".join(record.get("reasons") or ["not finished"])
