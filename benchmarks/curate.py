"""Data curation (`data.curate`) on synthetic chat rows: the seconds each setting adds to preparing the data.

100k `messages` rows (an 8-word question, a 60-word answer, Zipf-distributed words) with 5% exact and 5% near duplicates,
and 1000 eval rows, prepared by `load_data` with each step alone, then all together. Token
lengths are counted with the builtin tiny model's byte-level tokenizer (a token per byte: the worst
case) and with a 16k-token byte-level BPE trained on the rows (like the Hub's GPT-2-style ones), each
rendering rows through the chat template (`max_tokens` alone tokenizes only rows long enough in
bytes to be over it; `min_tokens` tokenizes every row). Reported: the seconds spent in curate.py, wall and CPU
(on a shared machine the CPU time of this one process is what it would take alone).
Run: OMP_NUM_THREADS=1 python benchmarks/curate.py [--rows 100000]
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = [  # (name, data.curate settings, tokenizer: "tiny" or "bpe")
    ("dedup + drop_empty", {"dedup": True, "drop_empty": True}, "tiny"),
    ("near_dedup 0.8", {"near_dedup": 0.8}, "tiny"),
    ("max_tokens 2048", {"max_tokens": 2048}, "tiny"),
    ("min_tokens 16", {"min_tokens": 16}, "tiny"),
    ("min_tokens 16", {"min_tokens": 16}, "bpe"),
    ("contamination", {"contamination": "remove"}, "tiny"),
    ("all but min_tokens", {"dedup": True, "drop_empty": True, "near_dedup": 0.8, "max_tokens": 2048,
                            "contamination": "remove"}, "bpe"),
]


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write(folder: Path, rows: int) -> None:
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    zipf = [1 / rank for rank in range(1, len(vocab) + 1)]  # word frequencies as in natural text

    def words(k):
        return " ".join(rng.choices(vocab, zipf, k=k))

    out = [chat(words(8), words(60)) for _ in range(rows)]
    for i in range(0, rows, 20):  # every 20th row: an exact copy; every 20th + 10: one word changed
        out[i] = out[i + 1]
        changed = out[i + 11]["messages"][1]["content"].split()
        changed[0] = "changed"
        out[i + 10] = chat(out[i + 11]["messages"][0]["content"], " ".join(changed))
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    evals = [chat(words(8), words(60)) for _ in range(1000)]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))


def bpe_tokenizer(folder: Path) -> str:
    """A GPT-2-style byte-level BPE trained on the benchmark's rows, saved with the tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmtune.builtin import TINY_CHAT_TEMPLATE, TINY_SPECIALS

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    lines = (json.loads(line)["messages"][1]["content"] for line in open(folder / "train.jsonl"))
    core.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=16000, special_tokens=TINY_SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|end|>",
                                        pad_token="<pad>", chat_template=TINY_CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder / "bpe")
    return str(folder / "bpe")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LLMTUNE_CACHE"] = str(folder / "cache")  # every setting is a cache miss: measured cold
        from llmtune.data import load_data
        from llmtune.recipe.check import Checker
        from llmtune.recipe.schema import CurateSection

        write(folder, rows)
        model = {"name": "builtin:tiny", "revision": None, "chat_template": None, "trust_remote_code": False}
        from llmtune.builtin import builtin_path

        builtin_path("tiny")  # built once, outside the timings
        bpe = bpe_tokenizer(folder)
        from llmtune.data import curate

        spent = timers(curate, ("clean", "decontaminate"))
        import transformers  # noqa: F401 - imported once, outside the timings

        print(f"{rows} train rows, 1000 eval rows, {os.cpu_count()} CPU cores; seconds in data.curate's functions")
        for name, settings, kind in STEPS:
            tokenizer = {**model, "name": bpe} if kind == "bpe" else model
            curate_spec = Checker(str).section(CurateSection, dict(settings), ())
            data = {"train": [{"path": str(folder / "train.jsonl")}], "eval": [{"path": str(folder / "eval.jsonl")}],
                    "max_length": 1024, "curate": curate_spec}
            spent.update(wall=0.0, cpu=0.0)
            prepared = load_data(data, method="sft", seed=0, model=tokenizer)
            removed = {k: v["count"] for k, v in prepared.sources[0].curated.items() if v["removed"] and v["count"]}
            print(f"{name:<20} ({kind:>4}) {spent['wall']:5.1f} s wall, {spent['cpu']:5.1f} s CPU; "
                  f"{len(prepared.train)} rows kept, removed {removed}")

def timers(module, names) -> dict:
    """Wrap `module`'s functions `names` to add their wall and CPU seconds to the returned dict."""
    spent = {"wall": 0.0, "cpu": 0.0}
    for name in names:
        def timed(*args, _real=getattr(module, name), **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return _real(*args, **kwargs)
            finally:
                spent["wall"] += time.perf_counter() - wall
                spent["cpu"] += time.process_time() - cpu
        setattr(module, name, timed)
    return spent

if __name__ == "__main__":
    main()
