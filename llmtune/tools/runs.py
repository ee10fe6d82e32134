"""`llmtune runs` (the run directories under a folder, one line each) and `llmtune compare` (runs side by side:
resolved-recipe differences key by key, metrics, an overlay plot). Reads only what each run wrote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError
from ..runner import metrics as judged

PLOT_TYPES = (".png", ".svg", ".pdf")


@dataclass
class Run:
    path: Path
    manifest: dict
    recipe: dict
    logged: list[dict]

    @property
    def method(self) -> str:
        return self.manifest.get("method", "?")

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics") or {}

    @property
    def steps(self) -> int | None:
        return max((row["step"] for row in self.logged if "step" in row), default=None)

    @property
    def rows_used(self) -> str:
        used = [s.get("used") for s in self.manifest.get("data") or []]
        return "streamed" if None in used else str(sum(used))

    @property
    def duration(self) -> str:
        try:
            started = dt.datetime.fromisoformat(self.manifest["started"])
            finished = dt.datetime.fromisoformat(self.manifest["finished"])
        except (KeyError, TypeError, ValueError):
            return "-"
        minutes, seconds = divmod(round((finished - started).total_seconds()), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"

    @property
    def commit(self) -> str:
        git = self.manifest.get("recipe_git") or {}
        return (git.get("commit") or "-")[:8] + ("+dirty" if git.get("dirty") else "")


def is_run(folder: Path) -> bool:
    """A training run's directory (a merged model's folder has a manifest too, without a method)."""
    try:
        return "method" in json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load(folder: Path) -> Run:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    recipe_file = folder / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    log = folder / "metrics.jsonl"
    logged = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if log.is_file() else []
    return Run(folder, manifest, recipe or {}, logged)


def find(folder: Path) -> list[Run]:
    """The runs under `folder` (at any depth, hidden folders skipped), oldest first."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory; pass the folder holding your runs (the recipes' "
                        "`output_dir` parent, e.g. runs)")
    found = [p.parent for p in folder.rglob("manifest.json")
             if not any(part.startswith(".") for part in p.relative_to(folder).parts) and is_run(p.parent)]
    return sorted((load(p) for p in found), key=lambda r: (r.manifest.get("started") or "", str(r.path)))


def table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def key_metrics(run: Run, most: int = 3) -> str:
    """The first few metrics the run's method is judged by (the eval loss over the train loss)."""
    shown = judged.headline(run.method, run.metrics)
    if "eval_loss" in shown:
        shown.pop("train_loss", None)
    return " ".join(f"{k}={judged.fmt(v)}" for k, v in list(shown.items())[:most]) or "-"


def list_runs(folder: Path) -> list[str]:
    """`llmtune runs`: one line per run under `folder`."""
    runs = find(folder)
    if not runs:
        return [f"no run directories under {folder} (a run directory holds the manifest.json a training command "
                "writes)"]
    header = ["run", "status", "method", "model", "rows", "steps", "duration", "commit", "key metrics"]
    return table([header] + [[r.path.relative_to(folder).as_posix(), r.manifest.get("status", "?"), r.method,
                              str((r.recipe.get("model") or {}).get("name", "?")), r.rows_used,
                              str(r.steps if r.steps is not None else "-"), r.duration, r.commit, key_metrics(r)]
                             for r in runs])


def flatten(value, prefix: str = "") -> dict:
    """A nested recipe as dotted keys (`train.learning_rate`, `data.train[0].path`); lists of plain values stay
    whole."""
    if isinstance(value, dict) and value:
        items = [(f"{prefix}.{key}" if prefix else str(key), inner) for key, inner in value.items()]
    elif isinstance(value, list) and any(isinstance(inner, (dict, list)) for inner in value):
        items = [(f"{prefix}[{i}]", inner) for i, inner in enumerate(value)]
    else:
        return {prefix: value}
    return {key: leaf for name, inner in items for key, leaf in flatten(inner, name).items()}


def _cell(value) -> str:
    return judged.fmt(value) if isinstance(value, float) else json.dumps(value) if isinstance(value, (list, dict)) \
        else "null" if value is None else str(value)


def gate_rows(runs: list[Run]) -> list[list[str]]:
    """The recipe's `eval:` gate: each task's judged metric before -> after training, and the verdict."""
    gates = [r.manifest.get("eval_gate") or {} for r in runs]
    tasks = list(dict.fromkeys(task for gate in gates for task in gate.get("change") or {}))
    if not tasks:
        return []

    def cell(gate: dict, task: str) -> str:
        row = (gate.get("change") or {}).get(task)
        return f"{judged.fmt(row['before'])} -> {judged.fmt(row['after'])}" if row else "-"

    return [*([f"eval {task}", *(cell(gate, task) for gate in gates)] for task in tasks),
            ["eval gate", *(gate.get("verdict", "-") for gate in gates)]]


def default_out(paths: list[Path]) -> Path:
    """Beside the first run: compare-A-vs-B.png (names cut, with a hash, past 80 characters)."""
    name = "-vs-".join(p.name for p in paths)
    if len(name) > 80:
        name = f"{name[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return paths[0].parent / f"compare-{name}.png"


def compare(paths: list[Path], out: Path | None = None) -> tuple[list[str], Path | None]:
    """`llmtune compare`: (lines to print, the overlay plot written or None when nothing was logged)."""
    problems = [f"{p}: not a run directory (no manifest.json written by a training command); pass folders such as "
                "runs/NAME" for p in paths if not is_run(p)]
    if len(paths) < 2:
        problems.append("compare needs two or more run directories, e.g. `llmtune compare runs/a runs/b`")
    if out is not None and out.suffix.lower() not in PLOT_TYPES:
        problems.append(f"--out {out}: the plot is written as {', '.join(PLOT_TYPES)}; end the file name with one")
    if problems:
        raise UserError(problems)
    runs = [load(p) for p in paths]
    names = [str(p) for p in paths]

    recipes = [flatten(r.recipe) for r in runs]
    keys = list(dict.fromkeys(k for recipe in recipes for k in recipe))
    differ = [k for k in keys if len({_cell(recipe[k]) if k in recipe else None for recipe in recipes}) > 1]
    lines = ["recipe differences (resolved recipe.yaml):"]
    if differ:
        lines += ["  " + line for line in table([["key", *names]] + [
            [k, *("-" if k not in recipe else _cell(recipe[k]) for recipe in recipes)] for k in differ])]
    else:
        lines.append("  none: the resolved recipes are the same")

    metric_keys = list(dict.fromkeys(k for r in runs for k in judged.headline(r.method, r.metrics)))
    rows = [["metric", *names], ["method", *(r.method for r in runs)], ["status", *(r.manifest.get("status", "?")
                                                                                   for r in runs)],
            ["steps", *(str(r.steps if r.steps is not None else "-") for r in runs)],
            *([k, *(_cell(r.metrics[k]) if k in r.metrics else "-" for r in runs)] for k in metric_keys),
            *gate_rows(runs), ["duration", *(r.duration for r in runs)]]
    lines += ["", "metrics (final; eval_* on the eval set):", *("  " + line for line in table(rows))]

    out = out or default_out(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    drawn = judged.plot({name: (r.method, r.logged) for name, r in zip(names, runs)}, out)
    if drawn:
        lines += ["", f"wrote {out} ({', '.join(drawn)})"]
    return lines, out if drawn else None
