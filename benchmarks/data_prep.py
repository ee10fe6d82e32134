"""Data preparation: detection + conversion (llmtune) and tokenization (TRL) of synthetic rows.

For each SFT format: rows/s on a first run and on a second run with the prepared-data
cache warm (goal: second run >= 10x faster), and the first run at several sizes to show
the cost grows linearly with rows. Run: python benchmarks/data_prep.py [--rows 100000]
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

from common import PYTHON, ROOT

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


def row(fmt: str, i: int, rng: random.Random) -> dict:
    q, a = f"question {i} " + "x" * rng.randint(5, 80), f"answer {i} " + "y" * rng.randint(5, 120)
    return {
        "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "alpaca": {"instruction": q, "input": "", "output": a},
        "prompt_completion": {"prompt": q, "completion": a},
        "text": {"text": q + " " + a},
    }[fmt]


def child(path: str) -> None:
    """One run in a fresh process: prints seconds for load_data and for TRL's tokenization."""
    sys.path.insert(0, str(ROOT))
    from llmtune.data import load_data
    from llmtune.methods import sft
    from llmtune.model import load_model, load_tokenizer
    from llmtune.run import quiet

    quiet()
    start = time.perf_counter()
    section = {"train": [{"path": path, "format": "auto", "columns": {}, "weight": 1.0}], "eval": 0.0,
               "max_length": 512, "packing": False}
    data = load_data(section, method="sft", seed=0)
    loaded = time.perf_counter()
    from trl import SFTConfig

    config = {"model": {"name": "builtin:tiny", "trust_remote_code": False, "dtype": "float32"}, "data": section}
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", bf16=False, dataset_num_proc=None,
                     **sft.defaults(config, data))
    tokenizer = load_tokenizer(config["model"])
    model = load_model(config)
    before = time.perf_counter()
    sft.build_trainer(args=args, model=model, tokenizer=tokenizer, data=data, peft_config=None, callbacks=[])
    print(json.dumps({"load": loaded - start, "tokenize": time.perf_counter() - before, "rows": len(data.train)}))


def measure(path: Path, cache: Path) -> dict:
    done = subprocess.run([PYTHON, __file__, "--child", str(path)], capture_output=True, text=True,
                          env={**os.environ, "LLMTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--child")
    opts = parser.parse_args()
    if opts.child:
        return child(opts.child)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'format':<18} {'rows':>7} {'1st load':>9} {'1st tok':>8} {'1st rows/s':>10} "
              f"{'2nd total':>9} {'speed-up':>8}")
        for fmt in FORMATS:
            path = work / f"{fmt}.jsonl"
            path.write_text("".join(json.dumps(row(fmt, i, rng)) + "\n" for i in range(opts.rows)))
            cache = work / f"cache-{fmt}"
            first, second = measure(path, cache), measure(path, cache)
            t1, t2 = first["load"] + first["tokenize"], second["load"] + second["tokenize"]
            print(f"{fmt:<18} {first['rows']:>7} {first['load']:>8.2f}s {first['tokenize']:>7.2f}s "
                  f"{first['rows'] / t1:>10.0f} {t2:>8.2f}s {t1 / t2:>7.1f}x")
        print("\nscaling (messages, first run, load + tokenize):")
        for n in (opts.rows // 4, opts.rows // 2, opts.rows):
            path = work / f"scale-{n}.jsonl"
            path.write_text("".join(json.dumps(row("messages", i, rng)) + "\n" for i in range(n)))
            first = measure(path, work / f"cache-scale-{n}")
            total = first["load"] + first["tokenize"]
            print(f"  {n:>7} rows: {total:6.2f}s  ({total / n * 1e6:.1f} us/row)")


if __name__ == "__main__":
    main()
