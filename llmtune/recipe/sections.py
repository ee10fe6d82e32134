"""Checks of one section each that the schema's types let through: `hub:`, `early_stopping:`,
`data.curate`. Recipe-only (nothing is read or loaded), so `validate` reports them too."""

from __future__ import annotations

import re
from pathlib import Path

from ..files import is_repo_id
from . import fields

_BRANCH = re.compile(r"[\w.-]+(/[\w.-]+)*")


def check_hub(checker, config: dict) -> None:
    """What the schema's types let through but the Hub would refuse, reported at validate time."""
    hub = config.get("hub")
    if not hub:
        return
    if isinstance(hub.get("repo_id"), str) and not is_repo_id(hub["repo_id"]):
        checker.error(("hub", "repo_id"), "`hub.repo_id` must be a Hub repository id `namespace/name` (your user or "
                      "organization, then letters, digits, `-`, `_` or `.`; no `--` or `..`), e.g. "
                      f"`my-org/my-model`; got {hub['repo_id']!r}")
    revision = hub.get("revision")
    if isinstance(revision, str) and (not _BRANCH.fullmatch(revision) or ".." in revision
                                      or revision.endswith(".lock")):
        checker.error(("hub", "revision"), f"`hub.revision` must be a branch name such as `experiments` or "
                      f"`v2/lora`; got {revision!r}")
    for i, pattern in enumerate(hub.get("include") or []):
        if isinstance(pattern, str) and (not pattern.strip() or Path(pattern).is_absolute()
                                         or ".." in Path(pattern).parts):
            checker.error(("hub", "include", i), f"`hub.include` patterns are relative to the run directory and "
                          f"stay inside it, e.g. `*.gguf`; got {pattern!r}")


def check_early_stopping(checker, method, config: dict) -> None:
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
    check_saves_at_evaluations(checker, train, "early stopping", ", or set `train.load_best_model_at_end: false`")


def check_saves_at_evaluations(checker, train: dict, who: str, other: str = "") -> None:
    """`who` loads the best checkpoint at the end, so one is saved at every evaluation; `other`: another fix."""
    strategy = train.get("eval_strategy", "steps")
    if train.get("save_strategy") not in (None, strategy):
        checker.error(("train", "save_strategy"), f"{who} loads the best checkpoint, so checkpoints are "
                      f"saved when evaluating: remove `train.save_strategy` (or set it to `{strategy}`){other}")
    save, every = train.get("save_steps"), train.get("eval_steps")
    if strategy == "steps" and save is not None and every is not None and save % every:
        checker.error(("train", "save_steps"), f"`train.save_steps: {save}` must be a multiple of `train.eval_steps: "
                      f"{every}` so the best evaluation has a checkpoint; remove it to save at every evaluation")


def check_curate(checker, config: dict) -> None:
    """Values of `data.curate` that each parse but mean nothing, reported before anything is read."""
    data = config.get("data") or {}
    spec = data.get("curate")
    if not spec:
        return
    where = ("data", "curate")
    near, low, high = spec.get("near_dedup"), spec.get("min_tokens"), spec.get("max_tokens")
    if near is not None and not 0 < near <= 1:
        checker.error(where + ("near_dedup",), f"`data.curate.near_dedup` is a similarity in (0, 1], e.g. 0.8; "
                      f"got {near}")
    for key, value in (("min_tokens", low), ("max_tokens", high), ("contamination_ngram",
                                                                   spec.get("contamination_ngram"))):
        if value is not None and value < 1:
            checker.error(where + (key,), f"`data.curate.{key}` must be >= 1; got {value}")
    if low is not None and high is not None and low > high:
        checker.error(where + ("min_tokens",), f"`data.curate.min_tokens: {low}` is above `max_tokens: {high}`: "
                      "no row could be kept")
    if spec.get("contamination", "off") != "off" and not data.get("eval"):
        checker.error(where + ("contamination",), "the contamination check compares train with eval rows, and "
                      "there is no eval set: add `data.eval:` (sources, or a fraction) or set `contamination: off`")
