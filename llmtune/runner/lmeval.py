"""lm-evaluation-harness on a model in memory: the tasks a `--tasks` text (or a recipe's `eval.tasks`) names,
loaded before any model, one scoring call, and the metrics kept. `llmtune eval` (tools/evaluation.py) and the
evaluations that gate a run (runner/gate.py) both score through here.
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from ..compat import load_task_yaml
from ..errors import UserError
from ..paths import SHIPPED
from ..recipe.loader import shipped_recipe

INSTALL = 'pip install "llmtune-recipes[eval]"'


@dataclass
class Spec:
    text: str  # as written in --tasks
    path: Path | None = None  # a task YAML file; None: `text` is an lm-eval task name (or glob)
    label: str = "--tasks"  # where it was written, for messages: `--tasks`, or the recipe's `eval.tasks`


def parse_tasks(text: str, label: str = "--tasks") -> list[Spec]:
    """Comma-separated task names, task files, folders of task files and shipped tasks (recipes/eval/)."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        shipped = shipped_recipe(item)
        if path.is_dir():
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not files:
                raise UserError(f"{label} {item}: the folder holds no task YAML files")
            specs += [Spec(str(f), f, label) for f in files]
        elif path.is_file():
            specs.append(Spec(item, path, label))
        elif shipped and shipped.is_relative_to((SHIPPED / "eval").resolve()):
            specs.append(Spec(item, shipped, label))
        elif path.suffix in (".yaml", ".yml") or os.sep in item:
            raise UserError(f"{label} {item}: no such task file")
        else:
            specs.append(Spec(item, None, label))
    if not specs:
        raise UserError(f"{label}: name at least one task, e.g. recipes/eval/chat-mc.yaml or hellaswag")
    return specs


def _local_paths(cfg: dict, folder: Path) -> dict:
    """A task config's relative data paths read from `folder` (its file's, as a recipe's are), where the data
    is there: the changed keys only. Paths found nowhere else stay relative to the working directory, as in
    lm-eval."""
    def fix(value):
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            return str((folder / value).resolve())
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    changed = {}
    if isinstance(cfg.get("dataset_path"), str):
        changed["dataset_path"] = fix(cfg["dataset_path"])
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        changed["dataset_kwargs"] = {**kwargs, "data_files": fix(kwargs["data_files"])}
    return {k: v for k, v in changed.items() if v != cfg[k]}


def _quiet_lm_eval() -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lm_eval(\.|$)")


def _load_specs(manager, spec: Spec) -> list:
    """What TaskManager.load takes for one --tasks item: the task names it matches, or its task file."""
    if spec.path is None:
        matched = manager.match_tasks([spec.text])
        if not matched:
            close = difflib.get_close_matches(spec.text, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else \
                "; `lm-eval ls tasks` lists them, or pass a task YAML file"
            raise UserError(f"{spec.label} {spec.text}: unknown lm-eval task{hint}")
        return matched
    try:
        cfg = load_task_yaml(spec.path, resolve_func=True)
    except Exception as err:  # YAML syntax, a bad include or !function: all the file's problem
        raise UserError(f"{spec.path}: cannot read the task file: {err}") from None
    if isinstance(cfg.get("group"), str):
        # By name, from the folder's index: lm-eval 0.4.13 loads a group neither from its path (it takes the task
        # list for the name) nor from a dict (group keys reach the member tasks). Members read their own data.
        return [cfg["group"]]
    if isinstance(cfg.get("task"), str) and "class" not in cfg:
        return [{**cfg, **_local_paths(cfg, spec.path.resolve().parent)}]
    if isinstance(cfg.get("task"), str):  # a Python-defined task
        return [str(spec.path)]
    raise UserError(f"{spec.path}: not an lm-eval task file (it has no `task:` name or `group:` with a task list)")


def load_tasks(specs: list[Spec]):
    """(TaskManager, {name: top-level Task or Group}): every task and its data, before the model loads."""
    from lm_eval.api.group import Group
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own ~15k task files takes seconds; only task names need them. A local file's
    # folder is indexed so a group file can name the tasks beside it.
    folders = sorted({str(s.path.resolve().parent) for s in specs if s.path})
    manager = TaskManager(include_defaults=any(s.path is None for s in specs), include_path=folders or None)
    wanted = [(f"{spec.label} {spec.text}", item) for spec in specs for item in _load_specs(manager, spec)]
    top = {}
    for shown, item in wanted:
        try:
            loaded = manager.load([item])
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as err:
            raise UserError(f"{shown}: {err}") from None
        children = {child for members in loaded["group_map"].values() for child in members}
        groups = [group for name, group in loaded["groups"].items() if name not in children]
        for obj in groups or loaded["tasks"].values():  # a task asked for twice runs once
            top.setdefault(obj.name if isinstance(obj, Group) else obj.task_name, obj)
    # A folder holding a group file and its members' files: the members run inside the group only.
    grouped = {task.task_name for obj in top.values() if isinstance(obj, Group) for task in obj.get_all_tasks()}
    return manager, {name: obj for name, obj in top.items() if isinstance(obj, Group) or name not in grouped}


def import_lm_eval(specs: list[Spec], verb: str):
    """lm-eval, imported with the Hub switched off when every task is local; a message naming the extra without it."""
    if all(s.path is not None for s in specs):  # read when datasets / huggingface_hub are imported, so set before
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import lm_eval
        import lm_eval.evaluator
    except ImportError as err:
        raise UserError(f"{verb} needs lm-evaluation-harness: {INSTALL} ({err})") from None
    return lm_eval


def score(model, tokenizer, tasks: tuple, *, limit=None, num_fewshot: int | None = None, batch_size=1,
          apply_chat_template: bool = False) -> dict:
    """lm-eval's results for `model` (a transformers or PEFT model in memory) on `tasks` (from `load_tasks`), as it
    returns them."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    manager, objects = tasks
    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # lm-eval 0.4.13 runs `git describe` in the working directory for a `git_hash` (dropped below) and lets git's
    # "fatal: not a git repository" reach the terminal (EleutherAI/lm-evaluation-harness#1691): skip it. Remove
    # once lm-eval keeps git's stderr to itself.
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(objects.values()), task_manager=manager, num_fewshot=num_fewshot,
            limit=limit, batch_size=batch_size, device=str(model.device), apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template, log_samples=False)
    return results


def metrics(results: dict) -> dict:
    """{task: {metric: value}} without standard errors; lm-eval's `metric,filter` keys lose a `none` filter."""
    out = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            out[task] = {key.removesuffix(",none"): value for key, value in values.items()
                         if isinstance(value, (int, float)) and "_stderr" not in key and key != "alias"}
    return out
