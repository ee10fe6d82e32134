"""DPO with cached reference log-probs vs without: the same tiny LoRA DPO run twice.

llmtune precomputes the reference model's log-probs and keeps them on disk keyed by model,
data and settings; the second run loads them instead of running the reference pass. The
first run pays for the pass (as plain TRL's `precompute_ref_log_probs` does on every run).
Run: python benchmarks/dpo_cache.py [--repeats 3] [--epochs 2]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table


def once(cache: Path, out: Path, epochs: int) -> tuple[float, float]:
    """(wall seconds, the reference pass's share measured as wall minus train_runtime)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([shutil.which("llmtune"), "dpo", str(ROOT / "recipes/dpo/tiny-lora.yaml"),
                           "--output-dir", str(out), "--set", f"train.num_train_epochs={epochs}"],
                          capture_output=True, text=True,
                          env={**os.environ, "LLMTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    log = (out / "train.log").read_text()
    return wall, 1.0 if "reference log-probs" in log and "loaded" in log else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    opts = parser.parse_args()
    cold, warm, hits = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            cache = Path(tmp) / f"cache-{i}"
            builtin = Path(tmp) / "builtin-seed"
            if builtin.exists():  # share the built tiny model; only data and log-prob caches start empty
                shutil.copytree(builtin, cache / "builtin")
            cold.append(once(cache, Path(tmp) / "out", opts.epochs)[0])
            if not builtin.exists():
                shutil.copytree(cache / "builtin", builtin)
            # The data cache is warm for both; remove it so only the log-prob cache differs.
            shutil.rmtree(cache / "data", ignore_errors=True)
            wall, hit = once(cache, Path(tmp) / "out", opts.epochs)
            warm.append(wall)
            hits.append(hit)
    table("DPO run, end to end", [("first run (reference pass)", cold), ("second run (cached)", warm)],
          "seconds", "first run (reference pass)")
    print(f"  second runs that loaded the cache: {int(sum(hits))}/{len(hits)}")


if __name__ == "__main__":
    main()
