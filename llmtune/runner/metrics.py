"""The metrics each method is judged by, under the names its trainer logs them (TRL's, or llmtune's PPO's).

The verb table's `Method.judged` (llmtune/verbs.py) drives the progress bar, the final summary, the plot's panels, the manifest's
metrics, the model card, `llmtune runs` and `llmtune compare`. A training value is the last one
logged (`metrics.jsonl`); an evaluated one is the trainer's `eval_<key>`. Pure functions over
logged rows; matplotlib is imported only to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..verbs import LOSS, METHODS, Metric


def judged(method: str) -> tuple[Metric, ...]:
    return METHODS[method].judged if method in METHODS else ()


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


def _value(metric: Metric, row: dict, prefix: str = "") -> float | None:
    key = prefix + ("loss" if metric.from_loss else metric.key)
    value = row.get(key)
    if not isinstance(value, (int, float)):
        return None
    return _exp(value) if metric.from_loss else float(value)


def final(method: str, logged: list[dict], metrics: dict) -> dict:
    """What to add to the run's final metrics: each judged metric's last logged training value, and perplexity.

    `metrics` already holds the trainer's `eval_*` values when there was an eval set.
    """
    out = {}
    for metric in judged(method):
        values = [v for v in (_value(metric, row) for row in logged) if v is not None]
        if values and metric.key not in metrics:
            out[metric.key] = values[-1]
        evaluated = _value(metric, metrics, "eval_")
        if metric.from_loss and evaluated is not None:
            out[f"eval_{metric.key}"] = evaluated
    return out


def headline(method: str, metrics: dict) -> dict:
    """The metrics a run of `method` is judged by, in order: losses, then each judged one (evaluated if it was)."""
    keys = ["train_loss", "eval_loss"]
    for metric in judged(method):
        keys.append(f"eval_{metric.key}" if f"eval_{metric.key}" in metrics else metric.key)
    return {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}


def _metric(key: str) -> Metric | None:
    return next((m for method in METHODS.values() for m in method.judged if m.key == key), None)


def label(key: str) -> str:
    """The human name of a headline key, e.g. `eval_rewards/accuracies` -> `reward accuracy (eval)`."""
    fixed = {"train_loss": "train loss", "eval_loss": "eval loss"}
    if key in fixed:
        return fixed[key]
    bare = key.removeprefix("eval_")
    name = m.label if (m := _metric(bare)) else bare
    return f"{name} (eval)" if key != bare else name


def about(key: str) -> str:
    if key in ("train_loss", "eval_loss"):
        return LOSS.about + (" on the eval set" if key == "eval_loss" else "")
    return m.about if (m := _metric(key.removeprefix("eval_"))) else ""


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(method: str, metrics: dict) -> str:
    """The line printed after a run: its headline metrics and the time it took."""
    shown = {**headline(method, metrics), **{k: metrics[k] for k in ("train_runtime",) if k in metrics}}
    return ", ".join(f"{k} {fmt(v)}" for k, v in shown.items())


def bar(method: str, logs: dict, shown: dict) -> dict:
    """Update the progress bar's fields from one logged row: loss, eval loss, the method's short metrics."""
    for metric in (LOSS, *judged(method)):
        if metric.short and isinstance(logs.get(metric.key), (int, float)):
            shown[metric.short] = f"{logs[metric.key]:.4f}"
    if isinstance(logs.get("eval_loss"), (int, float)):
        shown["eval_loss"] = f"{logs['eval_loss']:.4f}"
    return shown


def panels(methods) -> list[tuple[str, list[Metric]]]:
    """The plot's panels for runs of these methods: (title, metrics drawn in it), loss first (last for RL)."""
    out: dict[str, list[Metric]] = {}
    for method in dict.fromkeys(methods):
        chosen = [*judged(method), LOSS] if method in METHODS and METHODS[method].rewards else [LOSS, *judged(method)]
        for metric in chosen:
            if metric not in out.setdefault(metric.title, []):
                out[metric.title].append(metric)
    return list(out.items())


def _task_curves(runs: dict[str, tuple[str, list[dict]]]) -> list:
    """The recipe's `eval:` scores (`gate/TASK/METRIC`, before training at its first step, then as scored)."""
    curves = []
    for name, (_, logged) in runs.items():
        keys = dict.fromkeys(key for row in logged for key in row if key.startswith("gate/"))
        for key in keys:
            points = [(row["step"], row[key]) for row in logged if key in row and "step" in row]
            curves.append((points, "s-", " ".join(filter(None, [name, key.removeprefix("gate/")]))))
    return curves


def _points(metric: Metric, logged: list[dict], prefix: str) -> list[tuple[int, float]]:
    return [(row["step"], v) for row in logged if "step" in row
            and (v := _value(metric, row, prefix)) is not None and math.isfinite(v)]


def plot(runs: dict[str, tuple[str, list[dict]]], out: Path) -> list[str]:
    """One figure with a panel per judged metric that was logged, each run's training (line) and eval (dashed)
    curves overlaid; `runs` maps a name ("" for a single run) to (method, logged rows).

    Returns the titles of the panels drawn, and writes nothing when no panel had data.
    """
    drawn = []
    for title, metrics in panels(method for method, _ in runs.values()):
        curves = []
        for name, (_, logged) in runs.items():
            for metric in metrics:
                for prefix, style, kind in (("", "-", "train"), ("eval_", "o--", "eval")):
                    points = _points(metric, logged, prefix)
                    if points:
                        parts = [name, metric.label if len(metrics) > 1 else "", kind]
                        curves.append((points, style, " ".join(p for p in parts if p)))
        if curves:
            drawn.append((title, curves))
    tasks = _task_curves(runs)
    if tasks:
        drawn.append(("lm-eval tasks (eval:)", tasks))
    if not drawn:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, drawn):
        for points, style, name in curves:
            ax.plot(*zip(*points), style, label=name, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [title for title, _ in drawn]
