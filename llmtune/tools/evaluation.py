"""`llmtune eval`: score a run directory on lm-evaluation-harness tasks.

The model is loaded as `llmtune generate` loads it (`infer.load`: an adapter on its base,
quantized as in training, or a full or merged model) and handed to lm-eval's `HFLM`;
lm-eval builds the prompts, scores them and aggregates. `--tasks` takes lm-eval task
names (and globs such as `mmlu_*`), a task YAML file, a folder of them, or a task shipped
under recipes/eval/ (`eval/chat-mc`). With only local tasks nothing goes to the Hub.

Results land in RUN_DIR/eval/NAME.json and as an entry of manifest.json's `evals`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from ..compat import load_task_yaml
from ..errors import UserError
from ..files import read_manifest, write_json
from ..logs import quiet
from ..paths import SHIPPED
from ..recipe.loader import shipped_recipe
from ..runner import card
from ..runner.rundir import _now, package_versions
from ..secret import scrub
from .infer import is_adapter, load, model_head, run_recipe

INSTALL = 'pip install "llmtune-recipes[eval]"'
# lm-eval's result sections worth keeping; the rest is environment dumps, hashes and the chat template text.
KEPT = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
DROPPED_CONFIG = ("model_args", "model_sha", "use_cache")


@dataclass
class Options:
    limit: float | None = None  # rows per task (a fraction below 1)
    num_fewshot: int | None = None
    batch_size: str = "1"  # a number, or auto / auto:N
    chat_template: bool | None = None  # None: the run's training data decides (see chat_template_default)
    device: str | None = None


@dataclass
class Spec:
    text: str  # as written in --tasks
    path: Path | None = None  # a task YAML file; None: `text` is an lm-eval task name (or glob)


def parse_tasks(text: str) -> list[Spec]:
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
                raise UserError(f"--tasks {item}: the folder holds no task YAML files")
            specs += [Spec(str(f), path=f) for f in files]
        elif path.is_file():
            specs.append(Spec(item, path=path))
        elif shipped and shipped.is_relative_to((SHIPPED / "eval").resolve()):
            specs.append(Spec(item, path=shipped))
        elif path.suffix in (".yaml", ".yml") or os.sep in item:
            raise UserError(f"--tasks {item}: no such task file")
        else:
            specs.append(Spec(item))
    if not specs:
        raise UserError("--tasks: name at least one task, e.g. --tasks recipes/eval/chat-mc.yaml or --tasks hellaswag")
    return specs


def trained_on_chat(run_dir: Path) -> bool | None:
    """Whether the run's training data was conversational; None when its manifest does not say."""
    manifest = read_manifest(run_dir)
    if manifest.get("merged_from"):  # `llmtune merge` output: the trained run's manifest knows
        manifest = read_manifest(Path(manifest["merged_from"]))
    shape = manifest.get("data_shape")
    return None if shape is None else shape.startswith("conversational_")


def chat_template_default(run_dir: Path, tokenizer) -> tuple[bool, str]:
    """Apply the chat template unless the model has none or the run is known to have trained on plain text.

    A chat-trained model learned to answer after its template's assistant marker: scored on bare
    text it is measured on a format it never saw."""
    if not tokenizer.chat_template:
        return False, "not applied (the tokenizer has none)"
    chat = trained_on_chat(run_dir)
    if chat is False:
        return False, "not applied (the run trained on plain text)"
    return True, "applied (" + ("the run trained on conversations" if chat else "the tokenizer has one") + ")"


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
            raise UserError(f"--tasks {spec.text}: unknown lm-eval task{hint}")
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
    wanted = [(spec.text, item) for spec in specs for item in _load_specs(manager, spec)]
    top = {}
    for shown, item in wanted:
        try:
            loaded = manager.load([item])
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as err:
            raise UserError(f"--tasks {shown}: {err}") from None
        children = {child for members in loaded["group_map"].values() for child in members}
        groups = [group for name, group in loaded["groups"].items() if name not in children]
        for obj in groups or loaded["tasks"].values():  # a task asked for twice runs once
            top.setdefault(obj.name if isinstance(obj, Group) else obj.task_name, obj)
    # A folder holding a group file and its members' files: the members run inside the group only.
    grouped = {task.task_name for obj in top.values() if isinstance(obj, Group) for task in obj.get_all_tasks()}
    return manager, {name: obj for name, obj in top.items() if isinstance(obj, Group) or name not in grouped}


def _batch_size(text: str):
    if re.fullmatch(r"auto(:\d+)?", text):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"--batch-size {text}: give a number of rows or `auto` (largest that fits, found by trying)")


def _limit(value: float | None):
    if value is None:
        return None
    if value <= 0:
        raise UserError(f"--limit {value:g}: give a number of rows, or a fraction of each task between 0 and 1")
    return int(value) if value >= 1 else value


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: no such GPU here (torch sees {torch.cuda.device_count()})")
    return device


def _metrics(results: dict) -> dict:
    """{task: {metric: value}} without standard errors; lm-eval's `metric,filter` keys lose a `none` filter."""
    out = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            out[task] = {key.removesuffix(",none"): value for key, value in values.items()
                         if isinstance(value, (int, float)) and "_stderr" not in key and key != "alias"}
    return out


def _file_name(names: list[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(dict.fromkeys(names)))
    return name if len(name) <= 80 else f"{name[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _chat_template(choice: bool | None, run_dir: Path, tokenizer) -> tuple[bool, str]:
    if choice is None:
        return chat_template_default(run_dir, tokenizer)
    if choice and not tokenizer.chat_template:
        raise UserError(f"--apply-chat-template: the tokenizer in {run_dir} has no chat template")
    return choice, "applied (--apply-chat-template)" if choice else "not applied (--no-apply-chat-template)"


def evaluate(run_dir, tasks: str, options: Options) -> tuple[list[str], Path]:
    """Score the run on the tasks; (lines to print, results file). Nothing is written unless all went well."""
    run_dir = Path(run_dir)
    is_adapter(run_dir)  # a missing or unfinished run fails here, before anything loads
    if model_head(run_recipe(run_dir)) != "CausalLM":
        raise UserError(f"{run_dir}: a reward model scores whole texts; lm-eval tasks need a language model")
    batch_size = _batch_size(options.batch_size)
    limit = _limit(options.limit)
    specs = parse_tasks(tasks)
    if all(s.path is not None for s in specs):  # read when datasets / huggingface_hub are imported, so set before
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import lm_eval
        import lm_eval.evaluator
    except ImportError as err:
        raise UserError(f"llmtune eval needs lm-evaluation-harness: {INSTALL} ({err})") from None
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    device = _device(options.device) if options.device else None
    quiet()
    _quiet_lm_eval()
    started = time.monotonic()
    manager, objects = load_tasks(specs)
    loaded = load(run_dir)
    model = loaded.model
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, ValueError) as err:  # e.g. an 8-bit model, which cannot move once loaded
            raise UserError(f"--device {options.device}: {err}") from None
    apply, why = _chat_template(options.chat_template, run_dir, loaded.tokenizer)
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    # lm-eval 0.4.13 runs `git describe` in the working directory for a `git_hash` (dropped below) and lets git's
    # "fatal: not a git repository" reach the terminal (EleutherAI/lm-evaluation-harness#1691): skip it. Remove
    # once lm-eval keeps git's stderr to itself.
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(objects.values()), task_manager=manager, num_fewshot=options.num_fewshot,
            limit=limit, batch_size=batch_size, device=str(model.device), apply_chat_template=apply,
            fewshot_as_multiturn=apply, log_samples=False)

    record = {"tasks": list(objects), "limit": limit, "num_fewshot": options.num_fewshot, "chat_template": apply,
              "seconds": round(time.monotonic() - started, 1), "lm_eval": lm_eval.__version__}
    out = save(run_dir, results, record)
    tables = [make_table(results)] + ([make_table(results, "groups")] if results.get("groups") else [])
    return [f"chat template: {why}", *(table.rstrip() for table in tables)], out


def save(run_dir: Path, results: dict, record: dict) -> Path:
    """RUN_DIR/eval/NAME.json (lm-eval's results, less environment dumps and secrets) and a manifest entry."""
    record = {**record, "time": _now()}
    config = {k: v for k, v in results.get("config", {}).items() if k not in DROPPED_CONFIG}
    payload = {"run_dir": str(run_dir), **record, "config": {**config, "model": str(run_dir)},
               "packages": package_versions(), **{k: results[k] for k in KEPT if k in results}}
    out = run_dir / "eval" / f"{_file_name(record['tasks'])}.json"
    out.parent.mkdir(exist_ok=True)
    write_json(out, json.loads(scrub(json.dumps(payload, default=str))))
    manifest = read_manifest(run_dir)
    entry = {**record, "file": str(out.relative_to(run_dir)), "metrics": _metrics(results)}
    write_json(run_dir / "manifest.json", {**manifest, "evals": [*manifest.get("evals", []), entry]})
    card.write(run_dir, scrub)  # the card shows the scores
    return out
