"""`data.curate:`: rows dropped (or flagged) before training, counted per source.

Runs inside `load_data` on the converted rows, before the eval hold-out and weighting (a row a
`weight:` repeats is a choice, not a duplicate). Train sources are cleaned together, in
recipe order, and so are eval sources; each dropped row is counted by the first step that
drops it:

1. `drop_empty`: a response that is empty or a placeholder (any assistant turn, completion,
   chosen or rejected; the text of a `text` row; the prompt of a prompt-only row).
2. `dedup`: a row identical to an earlier one.
3. `near_dedup`: a row whose word 3-gram Jaccard similarity to an earlier kept row is at
   least the threshold, estimated from 128 MinHash values and found through LSH bands.
4. `min_tokens`/`max_tokens`: token lengths from the model's tokenizer, conversations
   rendered by its chat template as training renders them; kept rows longer than
   `data.max_length` are counted as truncated. A row whose length in bytes already
   settles it is not tokenized: `max_tokens` alone is cheap, `min_tokens` tokenizes every row.

Once the eval set is known: 5. `contamination`: train rows sharing a `contamination_ngram`-word
n-gram with an eval row (rows shorter than that are compared whole), counted or dropped.

Counts and the locations (FILE:LINE) of a few rows per step go into each source's
`SourceReport.curated`, hence the manifest; `lines()` renders them for `llmtune data inspect`.
"""

from __future__ import annotations

import array
import collections
import itertools
import json
import re

from llmtune.errors import UserError
from llmtune.tokenizer import load_tokenizer

# What each step's count means, in the words `lines()` and the warnings use.
STEPS = {
    "empty": "empty or placeholder response(s)",
    "duplicates": "exact duplicate(s)",
    "near_duplicates": "near duplicate(s)",
    "too_short": "row(s) under min_tokens",
    "too_long": "row(s) over max_tokens",
    "truncated": "row(s) longer than data.max_length (cut in training)",
    "contaminated": "row(s) sharing an n-gram with the eval set",
}
EXAMPLES = 5  # row locations kept per step
NUM_PERM = 128  # MinHash values per row: the similarity estimate's error is about 0.04
SHINGLE = 3  # words per near-duplicate shingle
_WORD = re.compile(r"\w+")


def clean(groups, spec: dict, *, max_length: int | None, model: dict | None) -> None:
    """Apply steps 1-4 to each group of sources (`_Source` objects with aligned `rows` and `locations`)."""
    measure = None
    if spec["min_tokens"] is not None or spec["max_tokens"] is not None:
        if model is None:
            raise ValueError("token-length curation needs the recipe's `model:` section to load its tokenizer")
        measure = _token_counter(model)
    for sources in groups:
        for source in sources:
            source.report.curated = {}
        if spec["drop_empty"]:
            placeholders = {p.strip().lower() for p in spec["placeholders"]}
            _drop(sources, "empty", lambda rows: [_is_empty(r, placeholders) for r in rows])
        if spec["dedup"]:
            seen: set = set()
            _drop(sources, "duplicates", lambda rows: [_seen(seen, json.dumps(r, sort_keys=True)) for r in rows])
        if spec["near_dedup"] is not None:
            _drop(sources, "near_duplicates", _near_duplicates(sources, spec["near_dedup"]))
        if measure is not None:
            low, high = spec["min_tokens"], spec["max_tokens"]
            caps = [cap for cap in (high, max_length) if cap]

            def decides(bound: int) -> bool:  # whether a row's exact count can change a decision
                return (low is not None and bound >= low) or bool(caps and bound > min(caps))

            lengths = {id(r): n for s in sources for r, n in zip(s.rows, measure(s.rows, decides))}
            _drop(sources, "too_short", lambda rows: [lengths[id(r)] < (low or 0) for r in rows])
            _drop(sources, "too_long", lambda rows: [lengths[id(r)] > (high or float("inf")) for r in rows])
            if max_length:
                _drop(sources, "truncated", lambda rows: [lengths[id(r)] > max_length for r in rows], remove=False)


def decontaminate(train, eval_rows: list, spec: dict) -> list[str]:
    """Step 5: train rows sharing an n-gram with `eval_rows`, counted (and dropped for `remove`); warnings."""
    mode = spec["contamination"]
    if mode == "off" or not eval_rows:
        return []
    import numpy as np

    n, vocab = spec["contamination_ngram"], new_vocab()
    eval_grams, _ = _ngrams(*_word_ids([_text(r) for r in eval_rows], vocab), n)
    rows = [r for s in train for r in s.rows]
    grams, owner = _ngrams(*_word_ids([_text(r) for r in rows], vocab), n)
    hit = np.zeros(len(rows), dtype=bool)
    hit[owner[np.isin(grams, eval_grams)]] = True
    flags = iter(hit.tolist())
    _drop(train, "contaminated", lambda part: [next(flags) for _ in part], remove=mode == "remove")
    found = sum(s.report.curated["contaminated"]["count"] for s in train)
    if not found or mode == "remove":
        return []
    where = ", ".join(loc for s in train for loc in s.report.curated["contaminated"]["examples"][:2])
    return [f"{found} training row(s) share a {n}-word sequence with the eval set ({where}); the eval loss "
            "overstates how well the model generalises. Set `data.curate.contamination: remove` to drop them"]


def lines(report) -> list[str]:
    """What curation did to one source (a `SourceReport`), for `llmtune data inspect`; [] when it did not run."""
    results = report.curated or {}
    out = [f"  curate: {'removed' if r['removed'] else 'found'} {r['count']} {STEPS[step]} (e.g. "
           f"{', '.join(r['examples'])})" for step, r in results.items() if r["count"]]
    return out or (["  curate: every row kept"] if results else [])


def require_rows(sources, where: str) -> None:
    if sources and not any(s.rows for s in sources):
        counts = ", ".join(f"{r['count']} {STEPS[k]}" for s in sources for k, r in s.report.curated.items()
                           if r["removed"] and r["count"])
        raise UserError(f"{where}: `data.curate` removed every training row ({counts}); loosen its settings")


# --- steps ---------------------------------------------------------------------


def _drop(sources, step: str, flagged, remove: bool = True) -> None:
    """Count (and with `remove`, drop) the rows `flagged(rows)` marks, keeping rows and locations aligned."""
    for source in sources:
        marks = flagged(source.rows)
        hits = [loc for loc, mark in zip(source.locations, marks) if mark]
        source.report.curated[step] = {"count": len(hits), "removed": remove, "examples": hits[:EXAMPLES]}
        if remove and hits:
            kept = [(row, loc) for row, loc, mark in zip(source.rows, source.locations, marks) if not mark]
            source.rows, source.locations = [r for r, _ in kept], [loc for _, loc in kept]


def _seen(seen: set, key) -> bool:
    if key in seen:
        return True
    seen.add(key)
    return False


_ANSWERS = ("completion", "chosen", "rejected", "text")


def _responses(row) -> list:
    """The texts a row trains the model to produce (see the module docstring, step 1)."""
    if "messages" in row:
        return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    keys = [k for k in _ANSWERS if k in row]
    if not keys:  # prompt-only: the prompt is all there is
        prompt = row["prompt"]
        return [m["content"] for m in prompt] if isinstance(prompt, list) else [prompt]
    out = []
    for key in keys:
        value = row[key]
        out += [m["content"] for m in value if m["role"] == "assistant"] if isinstance(value, list) else [value]
    return out


def _is_empty(row, placeholders: set) -> bool:
    return any(not (text or "").strip() or text.strip().lower() in placeholders for text in _responses(row))


def _text(row) -> str:
    """Every string of a row, in order: what similarity is measured on."""
    parts = []
    for value in row.values():
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [m["content"] for m in value]
    return "\n".join(parts)


def _near_duplicates(sources, threshold: float):
    """A `flagged` function for `_drop` marking rows similar to an earlier kept row of the group."""
    import numpy as np

    rows = [r for s in sources for r in s.rows]
    grams, owner = _ngrams(*_word_ids([_text(r) for r in rows], new_vocab()), SHINGLE)
    signatures = _minhash(grams, owner, len(rows))
    r = _band_rows(threshold)
    bands = NUM_PERM // r
    # One 64-bit key per band: the band's values mixed together.
    keys = np.zeros((len(rows), bands), dtype=np.uint64)
    for i in range(r):
        keys = keys * np.uint64(0x100000001B3) ^ signatures[:, i::r][:, :bands]
    # Only rows sharing a band's key with another row can be near duplicates: the rest is skipped at once.
    shared = np.zeros(len(rows), dtype=bool)
    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    shared &= np.bincount(owner, minlength=len(rows)) > 0  # rows without words are `drop_empty`'s business
    buckets: list[dict] = [{} for _ in range(bands)]
    dropped = np.zeros(len(rows), dtype=bool)
    for index in np.flatnonzero(shared).tolist():
        row_keys = keys[index].tolist()
        candidates = {c for band, key in enumerate(row_keys) for c in buckets[band].get(key, ())}
        if any(np.mean(signatures[index] == signatures[c]) >= threshold for c in candidates):
            dropped[index] = True
        else:
            for band, key in enumerate(row_keys):
                buckets[band].setdefault(key, []).append(index)
    flags = iter(dropped.tolist())
    return lambda part: [next(flags) for _ in part]


def _band_rows(threshold: float) -> int:
    """Values per LSH band: the most (fewest candidates) that still find 99.5% of pairs at the threshold."""
    best = 1
    for r in range(1, NUM_PERM + 1):
        if 1 - (1 - threshold ** r) ** (NUM_PERM // r) >= 0.995:
            best = r
    return best


def new_vocab() -> dict:
    """Word -> id, numbered in order of first appearance (deterministic, unlike `hash()` of a string)."""
    return collections.defaultdict(itertools.count().__next__)


def _word_ids(texts: list[str], vocab: dict):
    """(word ids of every text, concatenated; offsets of each text's words), lower-cased `\\w+` words."""
    import numpy as np

    ids, offsets, number = array.array("Q"), [0], vocab.__getitem__
    for text in texts:
        ids.extend(map(number, _WORD.findall(text.lower())))
        offsets.append(len(ids))
    return np.frombuffer(ids, dtype=np.uint64) if ids else np.zeros(0, np.uint64), np.asarray(offsets)


_MULT = 0x9E3779B97F4A7C15  # odd 64-bit constants: the hashes wrap around modulo 2**64
_MIX = 0xBF58476D1CE4E5B9


def _ngrams(ids, offsets, n: int):
    """(64-bit hash of every n-word window, index of the text it is in); a text shorter than n words is one
    window of all its words."""
    import numpy as np

    lengths = np.diff(offsets)
    owner_of = np.repeat(np.arange(len(lengths)), lengths)
    hashes, owners = [], []
    if len(ids) >= n:
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        for k in range(n):
            h = h * np.uint64(_MULT) + ids[k:len(ids) - n + 1 + k] + np.uint64(1)
        start = owner_of[: len(h)]
        valid = np.arange(len(h)) + n <= offsets[1:][start]
        hashes.append(h[valid])
        owners.append(start[valid])
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if len(short):  # one window each, hashed the same way word by word
        h = np.zeros(len(short), dtype=np.uint64)
        for k in range(n - 1):
            live = lengths[short] > k
            h[live] = h[live] * np.uint64(_MULT) + ids[offsets[short][live] + k] + np.uint64(1)
        hashes.append(h ^ (lengths[short].astype(np.uint64) * np.uint64(_MIX)))  # apart from long texts' windows
        owners.append(short)
    if not hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    if len(hashes) == 1:  # already in text order
        return hashes[0], owners[0]
    hashes, owners = np.concatenate(hashes), np.concatenate(owners)
    order = np.argsort(owners, kind="stable")  # grouped by text, for reduceat
    return hashes[order], owners[order]


def _minhash(grams, owner, count: int):
    """(count, NUM_PERM) MinHash signatures: per seeded hash function, the smallest hash of each text's n-grams."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
    signatures = np.full((count, NUM_PERM), np.iinfo(np.uint64).max, dtype=np.uint64)
    if not len(grams):
        return signatures
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    rows = owner[starts]
    value = np.empty_like(grams)
    for i in range(NUM_PERM):  # in place: one buffer the size of the n-grams
        np.multiply(grams, a[i], out=value)
        np.add(value, b[i], out=value)
        np.right_shift(value, np.uint64(32), out=value)
        signatures[rows, i] = np.minimum.reduceat(value, starts)
    return signatures


def _token_counter(model: dict):
    """A function from rows to their token counts with the model's tokenizer, as training renders the rows."""
    tokenizer = load_tokenizer(model)

    def render(row) -> list[str]:
        if "messages" in row:
            return [tokenizer.apply_chat_template(row["messages"], tokenize=False)]
        answers = [row[k] for k in _ANSWERS if k in row] or [None]  # None: a prompt-only row
        chat = isinstance(row.get("prompt"), list) or any(isinstance(a, list) for a in answers)
        prompt = row.get("prompt", [] if chat else "")
        if chat:
            return [tokenizer.apply_chat_template(prompt + (a or []), tokenize=False,
                                                  add_generation_prompt=a is None) for a in answers]
        return [prompt + (a or "") for a in answers]

    def measure(rows, decides) -> list[int]:
        """Each row's token count; exact where `decides(upper bound)`, else that upper bound.

        Every token covers at least one byte of the normalized text (a byte-level token one byte, any
        other one character or more), and a pre-tokenizer may add one prefix space: so the normalized
        text's UTF-8 length + 1 bounds the count, and rows the bound already settles are not tokenized.
        """
        texts, owners = [], []
        for index, row in enumerate(rows):
            for text in render(row):
                texts.append(text)
                owners.append(index)
        per_text = [len(normalize(text).encode()) + 1 for text in texts]
        exact = [i for i, bound in enumerate(per_text) if decides(bound)]
        for i, tokens in zip(exact, encode([texts[i] for i in exact]) if exact else []):
            per_text[i] = len(tokens)
        counts = [0] * len(rows)
        for index, count in zip(owners, per_text):
            counts[index] = max(counts[index], count)  # preference rows: the longer answer
        return counts

    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the Rust one, without offsets
    normalizer = getattr(backend, "normalizer", None)
    normalize = normalizer.normalize_str if normalizer is not None else str
    if hasattr(backend, "encode_batch_fast"):
        def encode(texts):
            return backend.encode_batch_fast(texts, add_special_tokens=False)
    else:
        def encode(texts):
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return measure
