"""`llmtune validate` on large data: wall time, CPU time and peak memory next to `datasets.load_dataset("json")`.

Writes N chat rows (`messages`) and N plain-text rows (`text`) as JSON Lines into a temporary folder, a recipe
for each (sft on builtin:tiny, `data.max_length: 512`, so every conversation's prompt is rendered with the chat
template and tokenized), then for each file runs, each in a fresh process: `llmtune validate` and
`datasets.load_dataset("json", data_files=FILE)` (with an empty datasets cache, so it parses the file).
Peak memory is the largest resident set of the process and its children (`getrusage(RUSAGE_CHILDREN)`).
`--before DIR` also times the `llmtune` of another checkout (e.g. the main branch) on the same files.

Run: python benchmarks/validate.py [--rows 1000000] [--before /path/to/checkout]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, summary

LOAD = "import datasets, sys; print(len(datasets.load_dataset('json', data_files=sys.argv[1], split='train')))"


def write(folder: Path, rows: int) -> dict:
    """The chat and text files and their recipes: name -> (data file, recipe)."""
    rng, made = random.Random(0), {}
    for kind in ("chat", "text"):
        path = folder / f"{kind}.jsonl"
        with path.open("w") as f:
            for i in range(rows):
                q, a = f"question {i} " + "x" * rng.randint(5, 80), f"answer {i} " + "y" * rng.randint(5, 120)
                row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} \
                    if kind == "chat" else {"text": f"{q} {a}"}
                f.write(json.dumps(row) + "\n")
        recipe = folder / f"{kind}.yaml"
        recipe.write_text(f"method: sft\nmodel:\n  name: builtin:tiny\ndata:\n  train:\n    - path: {path}\n"
                          "  max_length: 512\n")
        made[kind] = (path, recipe)
    return made


def measure(argv, env=None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak MiB) of one command, run from a fresh process so that its children are its own."""
    probe = ("import json, resource, subprocess, sys, time; start = time.perf_counter(); "
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); wall = time.perf_counter() - start; "
             "use = resource.getrusage(resource.RUSAGE_CHILDREN); "
             "print(json.dumps([done.returncode, wall, use.ru_utime + use.ru_stime, use.ru_maxrss / 1024, "
             "done.stderr[-3000:]]))")
    # From a folder holding no `llmtune` package: `python -m` puts the working directory before PYTHONPATH.
    out = subprocess.run([PYTHON, "-c", probe, *map(str, argv)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True, cwd=tempfile.gettempdir())
    code, wall, cpu, peak, err = json.loads(out.stdout)
    if code:
        sys.exit(f"{' '.join(map(str, argv))} failed:\n{err}")
    return wall, cpu, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--before", type=Path, help="also time this checkout's llmtune (its PYTHONPATH)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write(folder, opts.rows)
        print(f"{opts.rows} rows per file; {len(os.sched_getaffinity(0))} usable cores; median of {opts.repeats}")
        print(f"{'file':<6} {'who':<24} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9} {'wall ratio':>10}")
        for kind, (path, recipe) in files.items():
            who = {"datasets.load_dataset": lambda n: measure(
                       [PYTHON, "-c", LOAD, path], {"HF_DATASETS_CACHE": str(folder / f"hf-{kind}-{n}")}),
                   "llmtune validate": lambda n: measure(
                       [PYTHON, "-m", "llmtune", "validate", recipe], {"PYTHONPATH": str(ROOT)})}
            if opts.before:
                who["llmtune validate (before)"] = lambda n: measure(
                    [PYTHON, "-m", "llmtune", "validate", recipe], {"PYTHONPATH": str(opts.before)})
            runs = {name: [] for name in who}
            for n in range(opts.repeats):  # interleaved, so a busy spell on the machine hits all alike
                for name, run in who.items():
                    runs[name].append(run(n))
            base = summary([r[0] for r in runs["datasets.load_dataset"]])[0]
            for name, results in runs.items():
                wall, cpu, peak = (summary([r[i] for r in results])[0] for i in range(3))
                print(f"{kind:<6} {name:<24} {wall:>8.1f} {cpu:>8.1f} {peak:>9.0f} {wall / base:>9.1f}x")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s in all)")
