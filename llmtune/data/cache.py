"""A content-addressed cache of prepared data, so a second run skips reading and converting.

The key covers everything the result depends on: the bytes of every local file, the
recipe's `data:` section, the method, the seed and the cache format. A changed file or
setting is a new key, never a stale hit (the axolotl cache bugs, LANDSCAPE pain point 14).
The datasets are saved as Arrow files; loaded back, they are memory-mapped and carry a
stable fingerprint, so `datasets` also caches TRL's tokenization of them across runs.
Hub sources are not cached here: `datasets` caches them itself.
"""

import hashlib
import json
from pathlib import Path

from llmtune.data.sources import local_fingerprint
from llmtune.errors import UserError
from llmtune.files import staged_folder
from llmtune.paths import cache_dir
from llmtune.secret import scrub

VERSION = 3  # bump when conversion changes what a cached dataset holds


def key(data, method, seed, model=None):
    """The cache key of a `data:` section, or None when a source is not local.

    `model` (the recipe's `model:` section) counts: its tokenizer's chat template and `data.curate`'s token counts
    change the rows.
    """
    specs = data["train"] + (data["eval"] if isinstance(data.get("eval"), list) else [])
    try:
        digests = [local_fingerprint(spec["path"], "") for spec in specs]
    except UserError:  # a missing file: the uncached path reports it, with every other problem
        return None
    if None in digests:
        return None
    recipe = {k: data.get(k) for k in ("train", "eval")}
    # The chat template changes conversations (system folding) and the warnings stored with them.
    recipe["tokenizer"] = {k: (model or {}).get(k) for k in ("name", "revision", "chat_template")}
    template = Path(str(recipe["tokenizer"]["chat_template"])).expanduser()
    if template.suffix in (".jinja", ".j2") and template.is_file():  # a template file edited in place
        recipe["tokenizer"]["template_sha256"] = hashlib.sha256(template.read_bytes()).hexdigest()
    spec = data.get("curate")
    if spec:
        recipe["curate"] = spec
    if model is not None:  # rows whose prompt fills max_length are left out (data/templates.py)
        recipe["max_length"] = data.get("max_length")
    payload = json.dumps([VERSION, method, seed, recipe, digests], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def folder(cache_key):
    return cache_dir() / "data" / cache_key


def has(cache_key) -> bool:
    return (folder(cache_key) / "meta.json").is_file()


def meta(cache_key) -> dict:
    return json.loads((folder(cache_key) / "meta.json").read_text(encoding="utf-8"))


def load(cache_key):
    """(train, eval, meta) from the cache, or None on a miss."""
    where = folder(cache_key)
    if not has(cache_key):
        return None
    import datasets

    info = meta(cache_key)
    train = datasets.load_from_disk(str(where / "train"))
    evals = datasets.load_from_disk(str(where / "eval")) if (where / "eval").is_dir() else None
    return train, evals, info


def store(cache_key, train, evals, meta):
    """Save atomically: a half-written entry is never seen as a hit."""
    import datasets

    datasets.disable_progress_bars()  # a cache write is not worth a progress bar
    target = folder(cache_key)
    try:  # another run storing the same key first: its copy is identical
        with staged_folder(target, replace=False) as tmp:
            train.save_to_disk(str(tmp / "train"))
            if evals is not None:
                evals.save_to_disk(str(tmp / "eval"))
            (tmp / "meta.json").write_text(scrub(json.dumps(meta)), encoding="utf-8")  # a secret in a data path
    except OSError:  # a full disk or a race with another run: the cache is only an optimisation
        pass
