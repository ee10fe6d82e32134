"""Data preparation: detection + conversion (llmtune) and tokenization (TRL) of synthetic rows.

For each SFT format: rows/s on a first run and on a second run with the prepared-data
cache warm (goal: second run >= 10x faster), and the first run at several sizes to show
the cost grows linearly with rows. Run: python benchmarks/data_prep.py [--rows 100000]

`--num-proc N` instead compares TRL's tokenization in one process (its default,
`dataset_num_proc: null`) with N worker processes, at several row counts, next to what
llmtune picks for each: where the workers' start-up pays off. Run:
python benchmarks/data_prep.py --num-proc 2 [--sizes 5000 10000 ...]
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


def child(path: str, num_proc: int | None = None) -> None:
    """One run in a fresh process: prints seconds for load_data and for TRL's tokenization."""
    sys.path.insert(0, str(ROOT))
    from llmtune.data import load_data
    from llmtune.logs import quiet
    from llmtune.methods import sft
    from llmtune.model import load_model
    from llmtune.tokenizer import load_tokenizer

    quiet()
    start = time.perf_counter()
    section = {"train": [{"path": path, "format": "auto", "columns": {}, "weight": 1.0}], "eval": 0.0,
               "max_length": 512, "packing": False}
    data = load_data(section, method="sft", seed=0)
    loaded = time.perf_counter()
    from trl import SFTConfig

    config = {"model": {"name": "builtin:tiny", "trust_remote_code": False, "dtype": "float32"}, "data": section}
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", bf16=False, dataset_num_proc=num_proc,
                     **sft.defaults(config, data))
    tokenizer = load_tokenizer(config["model"])
    model = load_model(config)
    before = time.perf_counter()
    sft.build_trainer(args=args, model=model, tokenizer=tokenizer, data=data, peft_config=None, callbacks=[])
    print(json.dumps({"load": loaded - start, "tokenize": time.perf_counter() - before, "rows": len(data.train)}))


def measure(path: Path, cache: Path, num_proc: int | None = None) -> dict:
    extra = ["--child-num-proc", str(num_proc)] if num_proc else []
    done = subprocess.run([PYTHON, __file__, "--child", str(path), *extra], capture_output=True, text=True,
                          env={**os.environ, "LLMTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, help="compare tokenizing in 1 and in N processes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10_000, 20_000, 50_000, 100_000],
                        help="row counts of the --num-proc comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--child-num-proc", type=int)
    opts = parser.parse_args()
    if opts.child:
        return child(opts.child, opts.child_num_proc)
    if opts.num_proc:
        return compare_processes(opts.num_proc, opts.sizes, opts.repeats)
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


def compare_processes(n: int, sizes: list[int], repeats: int) -> None:
    """TRL's tokenization (first run, cold caches) in one process and in `n`, per row count."""
    sys.path.insert(0, str(ROOT))
    from llmtune.defaults import tokenize_processes

    rng = random.Random(0)
    print(f"tokenizing `messages` rows, first run; {len(os.sched_getaffinity(0))} usable cores; seconds, median "
          f"of {repeats} [min .. max]")
    print(f"{'rows':>7} {'1 process (TRL)':>26} {f'{n} processes':>26} {'ratio':>6}  llmtune picks")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rows in sizes:
            path = work / f"rows-{rows}.jsonl"
            path.write_text("".join(json.dumps(row("messages", i, rng)) + "\n" for i in range(rows)))
            times = {None: [], n: []}
            for r in range(repeats):  # interleaved, so a busy spell on the machine hits both alike
                for procs in times:
                    times[procs].append(measure(path, work / f"cache-{rows}-{procs}-{r}", procs)["tokenize"])
            (one, lo1, hi1), (many, lo2, hi2) = summary(times[None]), summary(times[n])
            print(f"{rows:>7} {one:>9.2f} [{lo1:.2f} .. {hi1:.2f}] {many:>9.2f} [{lo2:.2f} .. {hi2:.2f}] "
                  f"{one / many:>5.2f}x  {tokenize_processes(rows) or 1}")


if __name__ == "__main__":
    main()
