"""Training data for a recipe: read, check, convert and mix the sources of `data:`.

``load_data`` reads every source (``sources``), detects or takes its format, checks every
row and converts it to one of TRL's dataset shapes (``formats``), then mixes the sources
by weight into a shuffled train set and an optional eval set (``mix``, whose docstring
says how weights and eval fractions count rows). Every problem in every source is
reported in one ``UserError``. Conversations are checked against the model's chat template
(``masking``); tokenizing and packing are left to TRL.

Nothing heavy is imported here: ``datasets`` is imported only once the data is built.
"""

import random

from llmtune.data import cache, curate, mix, scan, stream, templates
from llmtune.data.formats import FORMATS, to_dataset, to_kind
from llmtune.data.prepare import (
    PreparedData,
    SourceReport,
    load_sources,
    mixable,
    mixed,
    require_hold_out,
    trained_rows,
)
from llmtune.errors import UserError
from llmtune.tokenizer import load_tokenizer

__all__ = ["FORMATS", "PreparedData", "SourceReport", "check_data", "load_data"]

def check_data(data, *, method, seed, locate=lambda path: "recipe", model=None) -> list[str]:
    """Raise UserError if the data has problems, else return its warnings; data that a run prepared before is known
    good (and its warnings kept). Writes nothing (`validate`): the cache is filled by the run that uses the data.
    Local sources are read row by row and not held (scan.py); curated data and Hub datasets are loaded whole."""
    if data.get("streaming"):
        return stream.check(data, method=method, locate=locate, model=model)
    cache_key = cache.key(data, method, seed, model)
    if cache_key and cache.has(cache_key):
        return cache.meta(cache_key)["warnings"]
    if scan.streamable(data, locate):  # read row by row, not held: memory does not grow with the data
        return scan.check(data, method=method, seed=seed, locate=locate, model=model)
    return load_data(data, method=method, seed=seed, locate=locate, model=model, store=False).warnings


def load_data(data, *, method, seed, locate=lambda path: "recipe", model=None, store=True):
    """Build the train (and eval) sets of a validated `data:` section for `method`.

    `locate(("data", "train", 0, "path"))` names where a key is in the recipe
    (``recipe.yaml:14:11``); it prefixes problems about the recipe rather than a data row.
    `model` (the recipe's `model:` section) gives the tokenizer whose chat template conversations are checked
    against (data/masking.py) and that `data.curate` counts tokens with.
    The result depends only on the data, `seed` and, for token counts, the tokenizer.
    With `streaming:` the train set is a `datasets.IterableDataset` read lazily (stream.py).
    `store`: keep what was prepared in the cache (cache.py) for the next run.
    """
    if data.get("streaming"):
        return stream.load(data, method=method, seed=seed, locate=locate, model=model)
    cache_key = cache.key(data, method, seed, model)
    hit = cache_key and cache.load(cache_key)
    if hit:
        train_set, eval_set, meta = hit
        sources = [SourceReport(**report) for report in meta["sources"]]
        return PreparedData(train_set, eval_set, meta["shape"], sources, meta["warnings"])

    problems = []
    train = load_sources(data["train"], ("data", "train"), method, locate, problems)
    eval_spec = data.get("eval")
    eval_sources = eval_spec if isinstance(eval_spec, list) else []
    evals = load_sources(eval_sources, ("data", "eval"), method, locate, problems)
    if problems:
        raise UserError(problems)

    every = train + evals
    kind = mixable(every, locate)
    for source in every:
        source.rows = to_kind(source.rows, source.kind, kind)
    templated, cut = [], []
    if model is not None:
        tokenizer = load_tokenizer(model)
        templated = templates.check_template(every, kind[0], method, model, tokenizer, locate)
        if data.get("max_length"):
            cut = templates.drop_cut(every, data["max_length"], tokenizer)
            templates.require_trained(train, data["max_length"], locate(("data", "max_length")))
    spec = data.get("curate")
    if spec:
        curate.clean([train, evals], spec, max_length=data.get("max_length"), model=model)
        curate.require_rows(train, locate(("data", "curate")))

    rng = random.Random(seed)
    if evals:
        eval_rows = mixed(evals, rng)
    elif eval_spec:  # a fraction of the training rows
        eval_rows = _hold_out(train, eval_spec, rng, locate(("data", "eval")))
    else:
        eval_rows = None
    notes = curate.decontaminate(train, eval_rows or [], spec) if spec else []
    train_rows = mixed(train, rng)
    warnings = templated + cut + notes + trained_rows(len(train_rows), locate)

    prepared = PreparedData(
        train=to_dataset(train_rows),
        eval=None if eval_rows is None else to_dataset(eval_rows),
        shape=kind[0],
        sources=[source.report for source in every],
        warnings=warnings,
    )
    if cache_key and store:
        meta = {"shape": prepared.shape, "sources": [vars(s) for s in prepared.sources], "warnings": warnings}
        cache.store(cache_key, prepared.train, prepared.eval, meta)
        # Hand back the on-disk copy: TRL's tokenization of it is then cached for the next run too.
        stored = cache.load(cache_key)
        if stored:
            prepared.train, prepared.eval = stored[0], stored[1]
    return prepared


def _hold_out(train, fraction, rng, where):
    """Move a `fraction` of the train sources' rows into an eval set, which is returned."""
    require_hold_out(sum(len(source.rows) for source in train), fraction, where)
    kept, held = mix.hold_out([list(zip(source.rows, source.locations)) for source in train], fraction, rng)
    for source, pairs in zip(train, kept):
        source.rows, source.locations = [row for row, _ in pairs], [where for _, where in pairs]
    return [row for row, _ in held]
