"""`early_stopping:`: stop when the eval metric stops improving, and end on the best checkpoint.

transformers does the work (`EarlyStoppingCallback`, `load_best_model_at_end`); this module
turns the recipe's section into those settings and checks the combination before any model
is loaded. Import-light: `validate` runs `check`.
"""

from __future__ import annotations

from .recipe import fields


def check(checker, method, config: dict) -> None:
    """Problems of `early_stopping:` with the rest of the recipe, reported like every recipe error."""
    section = config.get("early_stopping")
    if section is None or method is None:
        return
    train = config.get("train") or {}
    where = ("early_stopping",)
    if "metric_for_best_model" not in fields.dataclass_fields(method.config):
        checker.error(where, f"`llmtune {method.name}` does not evaluate during training; remove `early_stopping:`")
        return
    if not (config.get("data") or {}).get("eval"):
        checker.error(where, "early stopping watches an eval metric, and there is no eval set: add `data.eval: 0.05` "
                      "(a held-out fraction of train) or eval sources under `data.eval:`")
    if train.get("eval_strategy") == "no":
        checker.error(("train", "eval_strategy"), "early stopping needs evaluations: remove `train.eval_strategy: no`")
    patience, threshold = section.get("patience"), section.get("threshold")  # None: reported as a bad value
    if patience is not None and patience < 1:
        checker.error(where + ("patience",), f"`early_stopping.patience` must be >= 1; got {patience}")
    if threshold is not None and threshold < 0:
        checker.error(where + ("threshold",), f"`early_stopping.threshold` must be >= 0; got {threshold}")
    if train.get("load_best_model_at_end") is False:
        return  # no checkpoint to load: any save schedule will do
    strategy = train.get("eval_strategy", "steps")
    if train.get("save_strategy") not in (None, strategy):
        checker.error(("train", "save_strategy"), f"early stopping loads the best checkpoint, so checkpoints are "
                      f"saved when evaluating: remove `train.save_strategy` (or set it to `{strategy}`), or set "
                      "`train.load_best_model_at_end: false`")
    save, every = train.get("save_steps"), train.get("eval_steps")
    if strategy == "steps" and save is not None and every is not None and save % every:
        checker.error(("train", "save_steps"), f"`train.save_steps: {save}` must be a multiple of `train.eval_steps: "
                      f"{every}` so the best evaluation has a checkpoint; remove it to save at every evaluation")


def settings(config: dict, method) -> dict:
    """The TrainingArguments `early_stopping:` implies; the recipe's `train:` goes over them."""
    section = config.get("early_stopping")
    if section is None:
        return {}
    train = config["train"]
    strategy = train.get("eval_strategy", "steps")
    out = {"load_best_model_at_end": True, "metric_for_best_model": section["metric"], "save_strategy": strategy,
           "save_total_limit": 1}  # transformers keeps the best checkpoint besides the newest
    if strategy == "steps":  # a checkpoint at every evaluation (transformers evaluates every logging_steps by default)
        out["save_steps"] = (train.get("eval_steps") or train.get("logging_steps")
                             or fields.dataclass_fields(method.config)["logging_steps"].default)
    return out


def callbacks(config: dict) -> list:
    section = config.get("early_stopping")
    if section is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=section["patience"],
                                  early_stopping_threshold=section["threshold"])]
