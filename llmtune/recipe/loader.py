"""Read a recipe: safe YAML with the line of every key, `extends:`, `--set`, `${...}`.

The result is plain data (dicts, lists, scalars) plus a map from each key path to where
it was written, so every later check can say `FILE:LINE:COL`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError
from ..paths import SHIPPED
from ..secret import SECRET_NAME
from .locations import resolve_paths

_REF = re.compile(r"\$\{([^}]*)\}")


class Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 scalars: `no`/`off` stay strings (`eval_strategy: no`), `1e-4` is a float."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^[-+]?(?:[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def parse_scalar(text: str):
    return yaml.load(text, Loader=Loader)


@dataclass
class Loc:
    file: str
    line: int = 0
    col: int = 0
    # The folder of the recipe file that wrote the key (what its relative paths are relative to); None: `--set`.
    folder: Path | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file


@dataclass
class Recipe:
    """A merged, interpolated recipe and where each of its keys came from."""

    path: Path
    data: dict
    locs: dict = field(default_factory=dict)
    # Values substituted from secret-looking environment variables; never written out.
    secrets: dict = field(default_factory=dict)
    # Paths the recipe names that do not exist (recipe/locations.py): problems for whatever needs the files.
    missing: list = field(default_factory=list)

    def locate(self, keypath) -> str:
        """`FILE:LINE:COL` of the key, else of its closest written parent."""
        keypath = tuple(keypath)
        while keypath not in self.locs and keypath:
            keypath = keypath[:-1]
        return str(self.locs.get(keypath, Loc(_display(self.path))))


def _display(path: Path) -> str:
    """The path as short as it reads clearly: relative below the working directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def shipped_recipe(name: str) -> Path | None:
    """A recipe shipped with llmtune, by name with or without `.yaml`."""
    for candidate in (SHIPPED / name, SHIPPED / f"{name}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _read_yaml(path: Path, problems: list) -> tuple[object, dict]:
    """Parse one file into (value, locations); syntax errors become problems."""
    shown = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
        loader = Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except OSError as err:
        problems.append(f"{shown}: cannot read recipe: {err.strerror}")
        return None, {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        problems.append(f"{where}: YAML syntax error: {err.problem or err.context}")
        return None, {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:  # binary garbage, control characters
        problems.append(f"{shown}: not a YAML text file ({err}); a recipe is UTF-8 text")
        return None, {}
    except RecursionError:  # thousands of nested `[` or `{`
        problems.append(f"{shown}: nested too deeply to be a recipe; a recipe is a few levels of sections")
        return None, {}
    if node is None:
        return {}, {}
    locs: dict = {}
    try:
        value = _build(node, (), shown, loader, locs, problems, _Expansion())
    except _TooLarge as err:
        problems.append(str(err))
        return None, {}
    except RecursionError:
        problems.append(f"{shown}: nested too deeply to be a recipe; a recipe is a few levels of sections")
        return None, {}
    for loc in locs.values():
        loc.folder = path.parent
    return value, locs


# A recipe holds hundreds of values; far more can only come from aliases expanding into
# copies of copies (a "billion laughs"), which would fill memory before anything is checked.
MAX_VALUES = 100_000


class _TooLarge(Exception):
    pass


class _Expansion:
    """Bounds alias expansion: the values built so far, and the nodes being built (an alias of its own parent)."""

    def __init__(self):
        self.built = 0
        self.open: set[int] = set()

    def enter(self, node, shown: str) -> None:
        self.built += 1
        if self.built > MAX_VALUES:
            raise _TooLarge(f"{shown}: the recipe expands to more than {MAX_VALUES:,} values (YAML aliases `*name` "
                            "repeating anchors `&name`); write the values out, or use fewer aliases")
        if id(node) in self.open:
            raise _TooLarge(f"{_node_loc(shown, node)}: YAML alias refers to the value it is part of (an endless "
                            "value); an anchor `&name` cannot be used inside itself")


# The tags a recipe's values may have (almost always implicitly). Any other, such as
# `!!python/object/apply:os.system`, asks the loader to build an object: refused, not ignored.
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")}


def _node_loc(shown: str, node) -> Loc:
    return Loc(shown, node.start_mark.line + 1, node.start_mark.column + 1)


def _plain(node, shown: str, problems: list) -> bool:
    if node.tag in PLAIN_TAGS:
        return True
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    problems.append(f"{_node_loc(shown, node)}: YAML tag '{tag}' is not allowed: a recipe holds plain values "
                    "(text, numbers, true/false, null, lists, mappings); remove the tag")
    return False


def _build(node, path: tuple, shown: str, loader, locs: dict, problems: list, expansion: _Expansion):
    expansion.enter(node, shown)
    if not _plain(node, shown, problems):
        return None
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        expansion.open.add(id(node))
        try:
            return _build_collection(node, path, shown, loader, locs, problems, expansion)
        finally:
            expansion.open.discard(id(node))
    return _scalar_value(node, shown, loader, problems)


def _build_collection(node, path: tuple, shown: str, loader, locs: dict, problems: list, expansion: _Expansion):
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<:` merge keys like PyYAML does
        out: dict = {}
        for key_node, value_node in node.value:
            if not _plain(key_node, shown, problems):
                continue
            key = _scalar_value(key_node, shown, loader, problems)
            where = _node_loc(shown, key_node)
            if not isinstance(key, str):
                problems.append(f"{where}: keys must be strings, got {key!r}")
                continue
            if key in out:
                problems.append(f"{where}: duplicate key '{key}' (the later one would silently win)")
                continue
            locs[path + (key,)] = where
            out[key] = _build(value_node, path + (key,), shown, loader, locs, problems, expansion)
        return out
    items = []
    for i, item in enumerate(node.value):
        locs[path + (i,)] = Loc(shown, item.start_mark.line + 1, item.start_mark.column + 1)
        items.append(_build(item, path + (i,), shown, loader, locs, problems, expansion))
    return items


def _scalar_value(node, shown: str, loader, problems: list):
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, KeyError) as err:  # e.g. `!!int abc`
        problems.append(f"{_node_loc(shown, node)}: cannot read {node.value!r} as "
                        f"{node.tag.replace('tag:yaml.org,2002:', '!!')} ({err}); remove the tag or fix the value")
        return None


def _merge(base, base_locs: dict, over, over_locs: dict, path: tuple = ()):
    """Maps merge key by key; lists and scalars from `over` replace."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            sub = path + (key,)
            if key in out:
                out[key] = _merge(out[key], base_locs, value, over_locs, sub)
            else:
                out[key] = value
                _copy_locs(over_locs, base_locs, sub)
            if sub in over_locs:
                base_locs[sub] = over_locs[sub]
        return out
    _drop_locs(base_locs, path)
    _copy_locs(over_locs, base_locs, path)
    return over


def _copy_locs(src: dict, dst: dict, prefix: tuple) -> None:
    n = len(prefix)
    for key, loc in src.items():
        if key[:n] == prefix:
            dst[key] = loc


def _drop_locs(locs: dict, prefix: tuple) -> None:
    n = len(prefix)
    for key in [k for k in locs if k[:n] == prefix and len(k) > n]:
        del locs[key]


def _resolve_extends(name: str, here: Path) -> Path | None:
    candidate = (here.parent / name).resolve()
    if candidate.is_file():
        return candidate
    return shipped_recipe(name)


def _load_tree(path: Path, chain: tuple, problems: list) -> tuple[dict, dict]:
    """Load a file and everything it extends, depth-first; the file itself wins."""
    data, locs = _read_yaml(path, problems)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        problems.append(f"{_display(path)}:1:1: a recipe must be a mapping of keys, got {type(data).__name__}")
        return {}, {}
    parents = data.pop("extends", None)
    if parents is None:
        return data, locs
    where = locs.get(("extends",), Loc(_display(path)))
    names = parents if isinstance(parents, list) else [parents]
    merged: dict = {}
    merged_locs: dict = {}
    for name in names:
        if not isinstance(name, str):
            problems.append(f"{where}: `extends` takes a recipe path or name, got {name!r}")
            continue
        parent = _resolve_extends(name, path)
        if parent is None:
            problems.append(f"{where}: extends '{name}': no such file next to this recipe, and no shipped recipe "
                            "of that name (see `llmtune recipes list`)")
            continue
        if parent in chain:
            cycle = " -> ".join(_display(p) for p in (*chain, parent))
            problems.append(f"{where}: extends cycle: {cycle}")
            continue
        p_data, p_locs = _load_tree(parent, chain + (parent,), problems)
        merged = _merge(merged, merged_locs, p_data, p_locs)
    locs = {k: v for k, v in locs.items() if k[:1] != ("extends",)}
    return _merge(merged, merged_locs, data, locs), merged_locs


def parse_set(item: str) -> tuple[tuple, object]:
    """`train.learning_rate=1e-4` -> (("train", "learning_rate"), 0.0001); values are YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    try:
        value = parse_scalar(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"--set {item}: value is not valid YAML ({getattr(err, 'problem', err)})") from None
    path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    return path, value


def _apply_set(data: dict, locs: dict, item: str, problems: list) -> None:
    path, value = parse_set(item)
    target = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                problems.append(f"--set {item}: '{'.'.join(map(str, path[:i + 1]))}' is not an item of the list")
                return
            target = target[part]
            continue
        if not isinstance(target, dict):
            problems.append(f"--set {item}: '{'.'.join(map(str, path[:i]))}' is not a section")
            return
        target = target.setdefault(part, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(target, list) and isinstance(last, int) and last < len(target):
        target[last] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        problems.append(f"--set {item}: cannot set '{'.'.join(map(str, path))}'")
        return
    _drop_locs(locs, path)
    locs[path] = Loc(f"--set {item}")


def _interpolate(data: dict, locs: dict, secrets: dict, problems: list) -> dict:
    """Replace `${env:VAR}` and `${dotted.key}` in strings, in place."""

    def lookup(ref: str, where: tuple, chain: tuple = ()):
        if ref in chain:  # `name: ${output_dir}` with `output_dir: runs/${name}`
            cycle = " -> ".join(f"${{{r}}}" for r in (*chain, ref))
            problems.append(f"{_loc(locs, where)}: interpolation cycle: {cycle}; one of them must be a plain value")
            return ""
        chain = (*chain, ref)
        if ref.startswith("env:"):
            var = ref[4:]
            if var not in os.environ:
                problems.append(f"{_loc(locs, where)}: environment variable '{var}' is not set "
                                f"(referenced as ${{{ref}}})")
                return ""
            if SECRET_NAME.search(var):
                secrets[var] = os.environ[var]
            return os.environ[var]
        node = data
        for part in ref.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                problems.append(f"{_loc(locs, where)}: ${{{ref}}} refers to '{ref}', which the recipe does not set")
                return ""
        if isinstance(node, (dict, list)):
            problems.append(f"{_loc(locs, where)}: ${{{ref}}} refers to a section; only values can be interpolated")
            return ""
        return _REF.sub(lambda m: str(lookup(m.group(1), where, chain)), node) if isinstance(node, str) else node

    def walk(node, path: tuple):
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, path + (i,)) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            whole = _REF.fullmatch(node)
            if whole:  # a lone reference keeps the referenced value's type (`seed: ${env:SEED}` is an int)
                value = lookup(whole.group(1), path)
                return _scalar(value) if whole.group(1).startswith("env:") else value
            return _REF.sub(lambda m: str(lookup(m.group(1), path)), node)
        return node

    return walk(data, ())


def _scalar(text: str):
    """An environment value read as a YAML scalar: '7' -> 7, 'true' -> True, else the string."""
    try:
        value = parse_scalar(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def _loc(locs: dict, path: tuple) -> str:
    while path and path not in locs:
        path = path[:-1]
    return str(locs.get(path, "recipe"))


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file with its `extends` chain, `--set` overrides and interpolation."""
    path = Path(path)
    if not path.is_file():
        shipped = shipped_recipe(str(path))
        if shipped is None:
            raise UserError(f"{path}: no such recipe file (shipped recipes: `llmtune recipes list`)")
        path = shipped
    path = path.resolve()
    problems: list[str] = []
    data, locs = _load_tree(path, (path,), problems)
    if not data and not problems:
        problems.append(f"{_display(path)}: the recipe is empty; start from a shipped one with "
                        f"`llmtune recipes copy quickstart {_display(path)}`")
    for item in overrides:
        _apply_set(data, locs, item, problems)
    data.setdefault("name", path.stem)
    data.setdefault("output_dir", "runs/${name}")
    secrets: dict = {}
    data = _interpolate(data, locs, secrets, problems)
    missing = resolve_paths(data, locs, path)
    if problems:
        raise UserError(problems)
    return Recipe(path=path, data=data, locs=locs, secrets=secrets, missing=missing)
