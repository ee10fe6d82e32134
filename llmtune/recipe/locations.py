"""Every path a recipe names, resolved by one rule, in one place.

A relative path written in a recipe file is relative to that file's folder (a path an `extends:` overlay
writes, to the overlay's folder): a recipe and what it names move together, in git or anywhere, and the
working directory never changes what a recipe means. A path given on the command line (`--set`) is
relative to the working directory, as every shell argument is. A key the recipe leaves out (the default
`output_dir: runs/NAME`) belongs to the recipe file. The recipes shipped inside llmtune are package files,
not a folder of yours: what ships with them (sample data, launch files) is found there, anything else
(`output_dir`, `runs/...`) in the working directory.

A value that may name a model (`model.name`, `ref_model`, `reward_model`, `teacher_model`) or a dataset
(`data.*.path`) is a Hub id only when it has the `owner/name` shape and nothing local claims it (`files.is_repo_id`), nor is it a
run beside the recipe's own runs (`runs/x` when `output_dir` is `runs/NAME`). Anything else is a path, and
one that does not exist is reported as a path, with its file:line, before anything runs (by `validate`
with data and every verb that uses the files; `validate --no-data` checks the recipe alone).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import BUILTIN_PREFIX, is_repo_id
from ..paths import SHIPPED

# Each key that holds a path ("*": every item of a list), and what it names.
PATH_KEYS = {
    ("output_dir",): "output",  # first: where runs go decides what `runs/x` in the keys below is
    ("model", "name"): "model",
    ("ref_model",): "model",
    ("reward_model",): "model",
    ("teacher_model",): "model",
    ("model", "chat_template"): "template",
    ("data", "train", "*", "path"): "data",
    ("data", "eval", "*", "path"): "data",
    ("launch", "deepspeed_config"): "file",
    ("train", "deepspeed"): "file",
    ("train", "fsdp_config"): "file",
    ("train", "accelerator_config"): "file",
    ("train", "resume_from_checkpoint"): "folder",
    ("reward_functions", "*"): "function",
    ("runs", "*", "path"): "model",  # a merge recipe's (tools/merging.py)
    ("base",): "model",
    ("eval", "judge"): "file",  # a judge recipe (recipe/judge.py)
}
TEMPLATE_SUFFIXES = (".jinja", ".j2")


def resolve_paths(data: dict, locs: dict, recipe: Path) -> list[str]:
    """Make every relative path in `data` absolute by the rule above, in place; the paths that do not exist, as
    messages (reported by what needs them: `Resolved.require_paths`, not `validate --no-data`)."""
    runs, problems = None, []
    for pattern, kind in PATH_KEYS.items():
        for keypath, value in _values(data, pattern):
            if not isinstance(value, str) or not value:
                continue  # the schema reports a wrong type
            loc = locs.get(keypath)
            base = _base(loc, recipe, value)
            resolved = _resolve(kind, value, base, runs)
            if isinstance(resolved, str):
                _set(data, keypath, resolved)
                if kind == "output":
                    runs = Path(resolved).parent
            else:
                dotted = ".".join(map(str, keypath))
                problems.append(f"{loc or recipe}: {dotted}: {value}: {resolved[0]} (relative to {base}); "
                                f"{resolved[1]}")
    return problems


def _values(data, pattern: tuple, prefix: tuple = ()):
    if not pattern:
        yield prefix, data
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        for i, item in enumerate(data if isinstance(data, list) else []):
            yield from _values(item, rest, prefix + (i,))
    elif isinstance(data, dict) and head in data:
        yield from _values(data[head], rest, prefix + (head,))


def _set(data, keypath: tuple, value) -> None:
    for part in keypath[:-1]:
        data = data[part]
    data[keypath[-1]] = value


def _base(loc, recipe: Path, value: str) -> Path:
    """The folder a relative `value` written at `loc` is relative to."""
    if loc is None:  # a default: the recipe file's
        folder = recipe.parent
    elif loc.folder is None:  # --set
        return Path.cwd()
    else:
        folder = loc.folder
    if folder == SHIPPED.resolve() or SHIPPED.resolve() in folder.parents:
        return folder if (folder / value).exists() else Path.cwd()
    return folder


def _resolve(kind: str, value: str, base: Path, runs: Path | None):
    """The resolved value, or (what is wrong, how to fix it)."""
    path = (base / os.path.expanduser(value)).absolute()
    path = Path(os.path.normpath(path))
    if kind == "output":
        return str(path)
    if kind == "model":
        if value.startswith(BUILTIN_PREFIX) or (is_repo_id(value, base) and path.parent != runs):
            return value
        return str(path) if path.is_dir() else (
            _not_a_folder(path), "give a model folder, a finished run directory (train it first: a reward model "
            "with `llmtune reward RECIPE`), or a Hub id such as `Qwen/Qwen2.5-0.5B`")
    if kind == "data":
        if is_repo_id(value, base) and not path.exists():
            return value
        return str(path) if path.exists() or any(ch in value for ch in "*?[") else (
            "no such file or folder", "give a data file, a folder or a glob, or a Hub dataset id (`owner/name`)")
    if kind == "template" and not value.endswith(TEMPLATE_SUFFIXES):
        return value  # a template TRL ships, by name
    if kind == "function":
        module, sep, function = value.partition(":")
        if not sep:
            return value  # check.py reports the shape
        if module.endswith(".py"):
            file = Path(os.path.normpath((base / os.path.expanduser(module)).absolute()))
            return f"{file}:{function}" if file.is_file() else (
                "no such file", "write the module's path relative to the recipe, or a module name importable from "
                "PYTHONPATH")
        beside = base / f"{module}.py"
        return f"{beside.absolute()}:{function}" if "." not in module and beside.is_file() else value
    if kind == "folder":
        return str(path) if path.is_dir() else (_not_a_folder(path), "fix the path")
    return str(path) if path.is_file() else ("not a file" if path.exists() else "no such file", "fix the path")


def _not_a_folder(path: Path) -> str:
    return "not a folder" if path.exists() else "no such folder"
