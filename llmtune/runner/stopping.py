"""`early_stopping:`: stop when the eval metric stops improving, and end on the best checkpoint (which
`eval.keep_best` asks for too, by an lm-eval task's score).

transformers does the work (`EarlyStoppingCallback`, `load_best_model_at_end`); this module
turns the recipe's section into those settings and checks the combination before any model
is loaded. Import-light: `validate` runs `check`.
"""

from __future__ import annotations

from ..recipe import fields


def settings(config: dict, method) -> dict:
    """The TrainingArguments that `early_stopping:` or `eval.keep_best` (the gate's `gate/TASK/METRIC`) imply;
    the recipe's `train:` goes over them."""
    section, keep = config.get("early_stopping"), (config.get("eval") or {}).get("keep_best")
    if section is None and keep is None:
        return {}
    train = config["train"]
    strategy = train.get("eval_strategy", "steps")
    metric = section["metric"] if section else f"gate/{keep}"
    out = {"load_best_model_at_end": True, "metric_for_best_model": metric, "save_strategy": strategy,
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
