"""Streaming (`data.streaming: true`): peak memory and rows/s of reading, converting and
tokenizing a whole file, against plain `datasets` streaming + TRL, and against llmtune
without streaming. Goal: peak memory stays flat as the rows grow.

Each measurement runs in a fresh process and reads every row once through SFTTrainer's
tokenization. Run: python benchmarks/streaming.py [--sizes 50000 100000 200000]
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT

# "plain": TRL on `datasets` streaming, read in file order; "plain shuffled": the same with the
# shuffle buffer (10,000 rows) a streaming run needs, as llmtune's.
MODES = {"llmtune streaming": "stream", "plain TRL, file order": "plain", "plain TRL + .shuffle()": "shuffled",
         "llmtune, no streaming": "whole"}


def child(path: str, mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    from llmtune.data import load_data
    from llmtune.logs import quiet
    from llmtune.methods import sft
    from llmtune.model import load_model
    from llmtune.tokenizer import load_tokenizer

    quiet()
    section = {"train": [{"path": path, "format": "auto", "columns": {}, "weight": 1.0}], "eval": None,
               "max_length": 512, "packing": False, "streaming": mode == "stream"}
    config = {"model": {"name": "builtin:tiny", "trust_remote_code": False, "dtype": "float32"}, "data": section}
    tokenizer, model = load_tokenizer(config["model"]), load_model(config)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch and the model, before any data
    start = time.perf_counter()
    if mode in ("plain", "shuffled"):
        import datasets
        from trl import SFTConfig, SFTTrainer

        from llmtune.data.stream import SHUFFLE_BUFFER

        train = datasets.load_dataset("json", data_files=path, split="train", streaming=True)
        if mode == "shuffled":
            train = train.shuffle(seed=0, buffer_size=SHUFFLE_BUFFER)
        args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", max_steps=1, bf16=False,
                         max_length=512, assistant_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    else:
        from trl import SFTConfig

        data = load_data(section, method="sft", seed=0)
        args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", max_steps=1, bf16=False,
                         **sft.defaults(config, data))
        trainer = sft.build_trainer(args=args, model=model, tokenizer=tokenizer, data=data, peft_config=None,
                                    callbacks=[])
    rows = sum(1 for _ in trainer.train_dataset)  # a stream is tokenized as it is read: read it all
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows, "data_mib": (peak - baseline) / 1024}))


def measure(path: Path, mode: str, cache: Path) -> dict:
    done = subprocess.run([PYTHON, __file__, "--child", str(path), mode], capture_output=True, text=True,
                          env={**os.environ, "LLMTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                               "HF_DATASETS_CACHE": str(cache / "datasets")})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    parser.add_argument("--child", nargs=2)
    opts = parser.parse_args()
    if opts.child:
        return child(*opts.child)
    rng = random.Random(0)
    print("peak memory above the loaded model (MiB) and rows/s, first run, `messages` rows; fresh caches")
    print(f"{'rows':>8}  " + "  ".join(f"{label:>26}" for label in MODES))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in opts.sizes:
            path = work / f"rows-{n}.jsonl"
            with path.open("w") as f:
                for i in range(n):
                    q, a = f"question {i} " + "x" * rng.randint(5, 80), f"answer {i} " + "y" * rng.randint(5, 120)
                    f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n")
            cells = []
            for label, mode in MODES.items():
                result = measure(path, mode, work / f"cache-{n}-{mode}")
                assert result["rows"] == n, result
                results[n, mode] = result
                cells.append(f"{result['data_mib']:>5.0f} MiB {n / result['seconds']:>6.0f} rows/s")
            print(f"{n:>8}  " + "  ".join(f"{cell:>26}" for cell in cells))
    small, large = min(opts.sizes), max(opts.sizes)
    for label, mode in MODES.items():
        grow = results[large, mode]["data_mib"] - results[small, mode]["data_mib"]
        print(f"{label}: {grow:+.0f} MiB from {small} to {large} rows")
    for mode in ("plain", "shuffled"):
        ratio = results[large, mode]["seconds"] / results[large, "stream"]["seconds"]
        print(f"llmtune streaming rows/s vs {mode} TRL at {large} rows: x{ratio:.2f} (higher: llmtune faster)")


if __name__ == "__main__":
    main()
