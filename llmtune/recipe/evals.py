"""The recipe's `eval:` section (evaluations that gate a run): values the schema's types let through but the run
cannot use, and task files read from the recipe's folder. Recipe-only, so `validate` reports them too."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import UserError
from ..paths import SHIPPED
from ..verbs import METHODS
from .judge import RUN, resolve_judge
from .loader import shipped_recipe
from .sections import check_saves_at_evaluations


def task_path(item: str, here: Path) -> str | None:
    """A task file or folder named relative to the recipe's folder `here`, as an absolute path; None when `item`
    is not one there (a shipped task, an lm-eval task name, or a path relative to the working directory)."""
    candidate = (here / os.path.expanduser(item))
    return str(candidate.resolve()) if not Path(item).is_absolute() and candidate.exists() else None


def _missing_file(item: str) -> bool:
    """Written as a task file or folder, and neither there nor a shipped task."""
    looks_like_path = Path(item).suffix in (".yaml", ".yml") or os.sep in item
    shipped = shipped_recipe(item)
    shipped_task = shipped is not None and shipped.is_relative_to((SHIPPED / "eval").resolve())
    return looks_like_path and not Path(item).expanduser().exists() and not shipped_task


def check_eval(checker, config: dict, here: Path) -> None:
    """Check `eval:` and make its task paths absolute (relative ones are read from the recipe's folder `here`)."""
    spec = config.get("eval")
    if not spec:
        return
    where = ("eval",)
    tasks = spec.get("tasks") or []
    if not tasks and not spec.get("judge"):
        checker.error(where + ("tasks",), "`eval:` scores nothing: name at least one task in `eval.tasks`, e.g. "
                      "`[eval/chat-mc]` (the shipped offline task) or `[hellaswag]`, or a judge recipe in "
                      "`eval.judge`")
    for i, item in enumerate(tasks):
        if not isinstance(item, str):
            continue
        resolved = task_path(item, here)
        if resolved:
            tasks[i] = resolved
        elif _missing_file(item):
            checker.error(where + ("tasks", i), f"no such task file {item!r} (relative paths are read from the "
                          "recipe's folder); give a task YAML file, a folder of them, a shipped task such as "
                          "`eval/chat-mc`, or an lm-eval task name")
    tolerance = spec.get("tolerance")
    if tolerance is not None and not tolerance >= 0:  # nor .nan
        checker.error(where + ("tolerance",), f"`eval.tolerance` is how far a task may get worse, >= 0 (e.g. "
                      f"0.02); got {tolerance}")
    for task, value in (spec.get("targets") or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            checker.error(where + ("targets", task), f"`eval.targets.{task}` must be a finite number; got {value}")
    for key, low in (("every_n_steps", 1), ("num_fewshot", 0)):
        if spec.get(key) is not None and spec[key] < low:
            checker.error(where + (key,), f"`eval.{key}` must be >= {low}; got {spec[key]}")
    if spec.get("limit") is not None and not spec["limit"] > 0:
        checker.error(where + ("limit",), f"`eval.limit` is a number of rows, or a fraction of each task between 0 "
                      f"and 1; got {spec['limit']}")
    if spec.get("keep_best") is not None:
        _check_keep_best(checker, config)
    if isinstance(spec.get("judge"), str) and Path(spec["judge"]).is_file():  # a missing file: a path problem
        try:
            resolve_judge(spec["judge"], run=RUN)
        except UserError as err:  # each at the judge recipe's own FILE:LINE
            checker.problems.extend(err.problems)
    method = METHODS.get(config.get("method"))
    if method is not None and method.head != "CausalLM":
        checker.error(where, f"`llmtune {method.name}` trains a {method.head} model, which scores whole texts; "
                      "lm-eval tasks need a language model: remove `eval:`")
    launch = config.get("launch") or {}
    processes = launch.get("num_processes")
    if (isinstance(processes, int) and processes > 1) or (launch.get("nodes") or 1) > 1:
        checker.error(where, "`eval:` scores the model in one process, and this recipe launches several: remove "
                      "`eval:` and score the finished run with `llmtune eval`, or train with `launch.num_processes: "
                      "1`")


def _check_keep_best(checker, config: dict) -> None:
    """`eval.keep_best` scores the tasks at the eval set's evaluations and loads the best checkpoint at the end."""
    spec, train = config["eval"], config.get("train") or {}
    where = ("eval", "keep_best")
    task, _, metric = spec["keep_best"].partition("/")
    if not task or not metric:
        checker.error(where, f"`eval.keep_best` is `TASK/METRIC` as lm-eval reports them, e.g. "
                      f"`llmtune_chat_mc/acc`; got {spec['keep_best']!r}")
    if not spec.get("tasks"):
        checker.error(where, "`eval.keep_best` names a task of `eval.tasks`, and none is scored: add it there, e.g. "
                      "`tasks: [eval/chat-mc]`")
    if not (config.get("data") or {}).get("eval"):
        checker.error(where, "`eval.keep_best` scores the tasks at every evaluation of the eval set, and there is "
                      "none: add `data.eval: 0.05` (a held-out fraction of train) or eval sources under `data.eval:`")
    if train.get("eval_strategy") == "no":
        checker.error(("train", "eval_strategy"), "`eval.keep_best` scores the tasks at every evaluation: remove "
                      "`train.eval_strategy: no`")
    if spec.get("every_n_steps") is not None:
        checker.error(("eval", "every_n_steps"), "`eval.keep_best` scores the tasks at every evaluation "
                      "(`train.eval_steps`): remove `eval.every_n_steps`")
    if config.get("early_stopping") is not None:
        checker.error(where, "`eval.keep_best` and `early_stopping:` both choose the checkpoint the run ends with: "
                      "keep one")
    for key in ("metric_for_best_model", "load_best_model_at_end"):
        if key in train:
            checker.error(("train", key), f"`eval.keep_best` sets `train.{key}`: remove it")
    check_saves_at_evaluations(checker, train, "`eval.keep_best`")
