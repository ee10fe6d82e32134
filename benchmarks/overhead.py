"""Wrapper overhead: a short LoRA SFT on the builtin tiny model, llmtune vs the same plain TRL script.

Measures end-to-end wall time (process start to exit) and training-loop tokens/s.
Goal: llmtune within 5% of plain TRL. Run: python benchmarks/overhead.py [--repeats 3]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, table

HERE = Path(__file__).resolve().parent
RECIPE = """\
method: sft
model: {{name: "builtin:tiny", dtype: float32}}
adapter: {{type: lora, r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
data:
  train: [{{path: {data}}}]
  max_length: 256
  packing: {packing}
train:
  learning_rate: 3.0e-3
  num_train_epochs: 2
  per_device_train_batch_size: 8
  gradient_checkpointing: false
  logging_steps: 5
  save_strategy: "no"
"""


def run(argv) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{argv} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start, done.stdout


def llmtune_once(work: Path, packing: bool) -> tuple[float, float]:
    out = work / "llmtune-out"
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = run([shutil.which("llmtune"), "sft", str(work / "recipe.yaml"), "--output-dir", str(out),
                   "--set", f"data.packing={str(packing).lower()}"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = json.loads((out / "manifest.json").read_text())["metrics"]["train_runtime"]
    tokens = [m["num_tokens"] for m in metrics if "num_tokens" in m][-1]
    return wall, tokens / runtime


def trl_once(work: Path, model_dir: str, packing: bool) -> tuple[float, float]:
    wall, out = run([PYTHON, str(HERE / "plain_trl_sft.py"), model_dir, str(ROOT / "recipes/data/chat.jsonl"),
                     str(work / "trl-out")] + (["--packing"] if packing else []))
    return wall, json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--packing", action="store_true", help="compare with packing on in both")
    opts = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from llmtune.builtin import builtin_path

    model_dir = str(builtin_path("tiny"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "recipe.yaml").write_text(RECIPE.format(data=ROOT / "recipes/data/chat.jsonl",
                                                        packing=str(opts.packing).lower()))
        results = {"plain TRL": [], "llmtune": []}
        for _ in range(opts.repeats):  # interleaved, so drift in machine load hits both alike
            results["plain TRL"].append(trl_once(work, model_dir, opts.packing))
            results["llmtune"].append(llmtune_once(work, opts.packing))
    table("End-to-end wall time", [(k, [w for w, _ in v]) for k, v in results.items()], "seconds", "plain TRL")
    table("Training-loop throughput", [(k, [t for _, t in v]) for k, v in results.items()], "tokens/s",
          "plain TRL", lower_is_better=False)


if __name__ == "__main__":
    main()
