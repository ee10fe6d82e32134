"""Shared helpers for the benchmarks: repeat, summarise, print a ratio table.

Benchmarks run on demand (`python benchmarks/NAME.py`), never in the test suite. Each one
measures llmtune and the plain-library equivalent in the same run, on the same machine.
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def timed(argv, env=None, cwd=None) -> float:
    """Wall seconds of one command; a failure stops the benchmark with its output."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(map(str, argv))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return elapsed


def summary(values) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def table(title: str, rows, unit: str, baseline: str, lower_is_better: bool = True) -> None:
    """rows: [(label, [values...])]; prints median, spread and the ratio to `baseline`."""
    medians = {label: statistics.median(values) for label, values in rows}
    print(f"\n{title}  ({unit}, median of {len(rows[0][1])}; ratio vs {baseline}"
          f"{', lower is better' if lower_is_better else ', higher is better'})")
    for label, values in rows:
        med, low, high = summary(values)
        print(f"  {label:<34} {med:10.4g}   [{low:.4g} .. {high:.4g}]   x{med / medians[baseline]:.3f}")


def padding_efficiency(attention_masks) -> float:
    """Fraction of real (non-padding) tokens over all token slots of the given batches.

    Each element is a 2-D 0/1 mask (batch x length); padding-free (packed) batches are
    1 x total and count as fully efficient.
    """
    real = sum(int(sum(sum(row) for row in mask)) for mask in attention_masks)
    slots = sum(len(mask) * len(mask[0]) for mask in attention_masks)
    return real / slots if slots else 0.0
