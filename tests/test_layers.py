"""The package's layering (docs/architecture.md): imports point down, never up, and never in a cycle.

Every import in llmtune/ is read with `ast`, module-level and function-local alike. Importing inside a
function is for weight only, never to dodge a cycle: a library of WEIGHT anywhere, an llmtune module only
where that module is heavy (it imports one of WEIGHT at module level, directly or through another llmtune
module), and in the CLI (LAZY), whose verbs import what they run so `--help` and `validate` start fast.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmtune"

# The layer of each module: the longest prefix listed wins. Imports may only go to the same layer or below.
LAYERS = {
    # L0 leaves: nothing from llmtune but each other (errors, mostly)
    "llmtune": 0, "llmtune.__init__": 0, "llmtune.errors": 0, "llmtune.paths": 0, "llmtune.verbs": 0,
    "llmtune.files": 0, "llmtune.ranks": 0, "llmtune.secret": 0, "llmtune.logs": 0, "llmtune.compat": 0,
    "llmtune.builtin": 0,
    "llmtune.recipe": 1,  # load, schema, fields, reference, jsonschema, copy, every recipe-only check
    "llmtune.data": 2, "llmtune.tokenizer": 2,
    "llmtune.model": 3, "llmtune.defaults": 3, "llmtune.memory": 3, "llmtune.launch": 3,
    "llmtune.methods": 4,  # recipe -> TRL config + trainer
    "llmtune.runner": 5,  # one session path, run directory, resume, interrupt, lock, stopping, diagnosis
    "llmtune.tools": 6,  # plan, inspect, infer, export, ollama, evaluation, push
    "llmtune.cli": 7, "llmtune.__main__": 7,
}

# Libraries worth a function-local import: each costs seconds (or a GPU check) to import.
WEIGHT = {"torch", "transformers", "trl", "datasets", "peft", "deepspeed", "lm_eval", "accelerate", "bitsandbytes",
          "liger_kernel", "safetensors", "tokenizers", "huggingface_hub", "gguf", "matplotlib", "numpy", "pyarrow"}


# Modules that import the rest of llmtune inside functions: the entry point, so each verb loads only its own.
LAZY = {"llmtune.cli"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    local: bool  # inside a function
    line: int


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _imports(tree: ast.AST):
    """(node, inside a function) for every import statement."""
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in local


def edges(root: Path, package: str) -> tuple[dict[str, Path], list[Edge], dict[str, set[str]]]:
    """The package's modules, its internal import edges, and the outside packages each imports at module level."""
    mods = modules(root, package)
    found, outside = [], {}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        outside[name] = set()
        for node, local in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if target.split(".")[0] != package:
                    if not local:
                        outside[name].add(target.split(".")[0])
                    continue
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    found.append(Edge(name, target, local, node.lineno))
    return mods, found, outside


def layer(module: str, table: dict[str, int]) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in table:
            return table[".".join(parts[:i])]
    raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def cycles(mods, found: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted({e.target for e in found if e.source == m}) for m in mods}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def heavy(mods, found: list[Edge], outside) -> set[str]:
    """Modules that import a WEIGHT library at module level, directly or through another llmtune module."""
    out = {m for m in mods if outside[m] & WEIGHT}
    grew = True
    while grew:
        more = {e.source for e in found if not e.local and e.target in out} - out
        out |= more
        grew = bool(more)
    return out


def violations(root: Path, package: str = "llmtune", table: dict[str, int] = LAYERS, lazy=LAZY) -> list[str]:
    mods, found, outside = edges(root, package)
    problems = [f"{e.source} -> {e.target} ({'function-local, ' if e.local else ''}"
                f"L{layer(e.source, table)} -> L{layer(e.target, table)}, line {e.line})"
                for e in found if layer(e.target, table) > layer(e.source, table)]
    problems += ["cycle: " + " <-> ".join(c) for c in cycles(mods, found)]
    weighty = heavy(mods, found, outside)
    problems += [f"{e.source} -> {e.target} (function-local, line {e.line}): {e.target} imports no heavy library "
                 "at module level, so import it at the top" for e in found
                 if e.local and e.target not in weighty and e.source not in lazy]
    return problems


def test_imports_point_down_without_cycles():
    assert violations(PACKAGE) == []


def test_every_module_has_a_layer():
    for module in modules(PACKAGE, "llmtune"):
        layer(module, LAYERS)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


TABLE = {"pkg": 0, "pkg.low": 0, "pkg.mid": 1, "pkg.top": 2}


def test_an_upward_import_is_named_with_its_layers(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "low.py": "from .mid import thing\n", "mid.py": "thing = 1\n",
                            "top.py": "from . import low\n"})
    assert violations(root, "pkg", TABLE) == ["pkg.low -> pkg.mid (L0 -> L1, line 1)"]


def test_a_cycle_closed_inside_a_function_is_caught(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "low.py": "", "mid.py": "import torch\nfrom . import top\n",
                            "top.py": "def f():\n    from .mid import x\n"})
    found = violations(root, "pkg", TABLE)
    assert "pkg.mid -> pkg.top (L1 -> L2, line 2)" in found
    assert "cycle: pkg.mid <-> pkg.top" in found


def test_a_function_local_import_of_a_light_module_is_refused(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "low.py": "import os\n", "mid.py": "import torch\n",
                            "top.py": "def f():\n    from . import low\n    from . import mid\n"})
    assert violations(root, "pkg", TABLE) == [
        "pkg.top -> pkg.low (function-local, line 2): pkg.low imports no heavy library at module level, so "
        "import it at the top"]


def test_the_real_package_catches_a_deliberate_upward_import(tmp_path):
    import shutil

    copy = tmp_path / "llmtune"
    shutil.copytree(PACKAGE, copy, symlinks=True, ignore=shutil.ignore_patterns("recipes", "__pycache__"))
    cache = copy / "data" / "cache.py"
    cache.write_text(cache.read_text(encoding="utf-8") + "\nfrom llmtune.model import load_model\n", encoding="utf-8")
    assert [v for v in violations(copy) if v.startswith("llmtune.data.cache -> llmtune.model (L2 -> L3")]


# Method names as string literals: only the verb table and the method runners may spell them.
METHOD_NAME_ALLOWED = ("llmtune/verbs.py", "llmtune/methods/")
# The same words meaning something else: the `kto` data format, the `reward` a run logs.
OTHER_MEANING = {("llmtune/data/formats.py", "kto"), ("llmtune/recipe/schema.py", "kto"),
                 ("llmtune/runner/rundir.py", "reward")}


def method_literals(root: Path, names) -> list[str]:
    """`FILE:LINE: 'name'` for every string literal in `root` that is a method name, outside the allowed files."""
    found = []
    for path in sorted(root.rglob("*.py")):
        shown = str(path.relative_to(root.parent))
        if shown.startswith(METHOD_NAME_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names \
                    and (shown, node.value) not in OTHER_MEANING:
                found.append(f"{shown}:{node.lineno}: {node.value!r}")
    return found


def test_method_names_are_listed_only_in_the_verb_table():
    from llmtune.verbs import METHODS

    assert method_literals(PACKAGE, set(METHODS)) == [], "method facts belong on `Method` in llmtune/verbs.py"


def test_a_method_name_outside_the_verb_table_is_found(tmp_path):
    _tree(tmp_path, {"__init__.py": "", "verbs.py": 'NAMES = ("dpo",)\n',
                     "check.py": 'def f(method):\n    return method == "ppo" or method in {"dpo"}\n'})
    (tmp_path / "pkg").rename(tmp_path / "llmtune")
    assert method_literals(tmp_path / "llmtune", {"dpo", "ppo"}) == ["llmtune/check.py:2: 'ppo'",
                                                                      "llmtune/check.py:2: 'dpo'"]
