"""Training data for a recipe: read, check, convert and mix the sources of `data:`.

``load_data`` reads every source (``sources``), detects or takes its format, checks every
row and converts it to one of TRL's dataset shapes (``formats``), then mixes the sources
by weight into a shuffled train set and an optional eval set (``mix``, whose docstring
says how weights and eval fractions count rows). Every problem in every source is
reported in one ``UserError``. Tokenizing, masking and packing are left to TRL.

Nothing heavy is imported here: ``datasets`` is imported only once the data is built.
"""

import random
from dataclasses import dataclass, field

from llmtune.data import cache, curate, mix
from llmtune.data.formats import (
    FORMATS,
    METHOD_FORMATS,
    common_kind,
    convert,
    describe_formats,
    describe_kind,
    detect,
    missing_columns,
    to_kind,
)
from llmtune.data.sources import read_source
from llmtune.errors import UserError

__all__ = ["FORMATS", "METHOD_FORMATS", "PreparedData", "SourceReport", "check_data", "load_data"]

# Below this many training rows, fine-tuning mostly memorises: worth a warning.
MIN_TRAIN_ROWS = 16
# Problems shown per source: past this the user has a systematic problem, not stray rows.
MAX_PROBLEMS = 20


@dataclass
class SourceReport:
    path: str  # as given in the recipe
    format: str  # detected or forced format name
    reason: str  # why this format was chosen
    rows: int | None  # rows read (before weighting); None for a stream (data.streaming)
    used: int | None  # rows contributed after eval hold-out and weighting; None for a stream
    sha256: str | None  # over the bytes of `files` in order; None for the Hub
    revision: str | None  # Hub commit the data was loaded at; None for local files
    files: list[str]  # local files read
    curated: dict = field(default_factory=dict)  # `data.curate` step -> {count, removed, examples} (curate.py)

    @property
    def counted(self) -> str:
        """Rows read and used, as the run's outputs show them; a stream is not counted in advance."""
        return "streamed" if self.rows is None else f"{self.rows} rows, {self.used} used"


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821 - imported lazily
    eval: "datasets.Dataset | None"  # noqa: F821
    shape: str  # TRL dataset shape of train and eval, e.g. "conversational_language_modeling"
    sources: list[SourceReport]  # train sources, then eval sources
    warnings: list[str]


@dataclass
class _Source:
    report: SourceReport
    rows: list  # converted rows
    kind: tuple  # (shape, columns) of the rows
    weight: float
    locations: list  # FILE:LINE of each row, kept aligned with `rows` until the eval hold-out
    cut: str | None = None  # FILE:LINE of the first row left out for training nothing at max_length (templates.py)


def check_data(data, *, method, seed, locate=lambda path: "recipe", model=None) -> list[str]:
    """Raise UserError if the data has problems, else return its warnings; data that a run prepared before is
    known good (and its warnings kept)."""
    if data.get("streaming"):
        from llmtune.data import stream

        stream.check(data, method=method, locate=locate)
        return []
    cache_key = cache.key(data, method, seed, model)
    if cache_key and cache.has(cache_key):
        return cache.meta(cache_key)["warnings"]
    return load_data(data, method=method, seed=seed, locate=locate, model=model).warnings


def load_data(data, *, method, seed, locate=lambda path: "recipe", model=None):
    """Build the train (and eval) sets of a validated `data:` section for `method`.

    `locate(("data", "train", 0, "path"))` names where a key is in the recipe
    (``recipe.yaml:14:11``); it prefixes problems about the recipe rather than a data row.
    `model` (the recipe's `model:` section) gives the tokenizer `data.curate` counts tokens with.
    The result depends only on the data, `seed` and, for token counts, the tokenizer.
    With `streaming:` the train set is a `datasets.IterableDataset` read lazily (stream.py).
    """
    if data.get("streaming"):
        from llmtune.data import stream

        return stream.load(data, method=method, seed=seed, locate=locate)
    cache_key = cache.key(data, method, seed, model)
    hit = cache_key and cache.load(cache_key)
    if hit:
        train_set, eval_set, meta = hit
        sources = [SourceReport(**report) for report in meta["sources"]]
        return PreparedData(train_set, eval_set, meta["shape"], sources, meta["warnings"])

    problems = []
    train = _load_sources(data["train"], ("data", "train"), method, locate, problems)
    eval_spec = data.get("eval")
    eval_sources = eval_spec if isinstance(eval_spec, list) else []
    evals = _load_sources(eval_sources, ("data", "eval"), method, locate, problems)
    if problems:
        raise UserError(problems)

    every = train + evals
    kind = common_kind(source.kind for source in every)
    if kind is None:
        listed = ", ".join(f"{source.report.path} is {describe_kind(source.kind)}" for source in every)
        raise UserError(f"{locate(('data', 'train'))}: data sources of different shapes cannot be mixed: {listed}")
    for source in every:
        source.rows = to_kind(source.rows, source.kind, kind)
    cut = []
    if model is not None:
        from llmtune.data import templates
        from llmtune.model import load_tokenizer

        tokenizer = load_tokenizer(model)
        if kind[0].startswith("conversational"):
            templates.check_rendering(every, model, tokenizer)
        if data.get("max_length"):
            cut = templates.drop_cut(every, data["max_length"], tokenizer)
            templates.require_trained(train, data["max_length"], locate(("data", "max_length")))
    spec = data.get("curate")
    if spec:
        curate.clean([train, evals], spec, max_length=data.get("max_length"), model=model)
        curate.require_rows(train, locate(("data", "curate")))

    rng = random.Random(seed)
    if evals:
        eval_rows = _mixed(evals, rng)
    elif eval_spec:  # a fraction of the training rows
        eval_rows = _hold_out(train, eval_spec, rng, locate(("data", "eval")))
    else:
        eval_rows = None
    notes = curate.decontaminate(train, eval_rows or [], spec) if spec else []
    train_rows = _mixed(train, rng)
    if not train_rows:
        raise UserError(f"{locate(('data', 'train'))}: no training rows are left after weighting; raise a `weight:`")

    warnings = cut + notes
    if len(train_rows) < MIN_TRAIN_ROWS:
        warnings.append(
            f"the training set has {len(train_rows)} row(s), fewer than {MIN_TRAIN_ROWS}: "
            "the model will learn little from it"
        )
    import datasets  # only now: bad data is reported without paying for this import

    prepared = PreparedData(
        train=datasets.Dataset.from_list(train_rows),
        eval=None if eval_rows is None else datasets.Dataset.from_list(eval_rows),
        shape=kind[0],
        sources=[source.report for source in every],
        warnings=warnings,
    )
    if cache_key:
        meta = {"shape": prepared.shape, "sources": [vars(s) for s in prepared.sources], "warnings": warnings}
        cache.store(cache_key, prepared.train, prepared.eval, meta)
        # Hand back the on-disk copy: TRL's tokenization of it is then cached for the next run too.
        stored = cache.load(cache_key)
        if stored:
            prepared.train, prepared.eval = stored[0], stored[1]
    return prepared


def _load_sources(specs, key, method, locate, problems, load=None):
    """The sources that `load` (default: read whole) cleanly; the problems of the others go into `problems`."""
    loaded = []
    for index, spec in enumerate(specs):
        try:
            loaded.append((load or _load_source)(spec, key + (index,), method, locate))
        except UserError as error:
            shown = error.problems[:MAX_PROBLEMS]
            if len(error.problems) > MAX_PROBLEMS:
                shown.append(f"... and {len(error.problems) - MAX_PROBLEMS} more problems in {spec['path']}")
            problems += shown
    return loaded


def _load_source(spec, key, method, locate):
    path = spec["path"]
    read = read_source(
        path,
        name=spec.get("name"),
        split=spec.get("split", "train"),
        revision=spec.get("revision"),
        where=locate(key + ("path",)),
    )
    rows, fmt, reason, (converted, kind) = detected(spec, read.rows, read.problems, key, method, locate)
    report = SourceReport(path, fmt, reason, len(converted), 0, read.sha256, read.revision, read.files)
    return _Source(report, converted, kind, spec.get("weight", 1.0), [where for where, _ in rows])


def detected(spec, rows, problems, key, method, locate):
    """A source's `rows` renamed by `columns:`, its format and why, and the rows converted
    with their kind; raises every problem, `problems` (what reading found) included."""
    path = spec["path"]
    if not rows:  # every file empty or unreadable: nothing to detect a format from
        raise UserError(problems)
    try:
        rows = _renamed(rows, spec.get("columns") or {}, path, locate(key + ("columns",)))
        fmt, reason = _format_of(spec.get("format", "auto"), _columns(rows), path)
        accepted = METHOD_FORMATS[method]
        if fmt not in accepted:
            raise UserError(
                f"{path}: method '{method}' cannot train on '{fmt}' data; it needs one of: {', '.join(accepted)}"
            )
    except UserError as error:  # this source's own problem first, then what reading found
        raise UserError(error.problems + problems) from None
    converted, kind, row_problems = convert(rows, fmt)
    if problems or row_problems:
        raise UserError(problems + row_problems)
    return rows, fmt, reason, (converted, kind)


def _columns(rows):
    """Column names in order of first appearance; a column that is null in every row is
    absent (Parquet and Hub tables give every row every column)."""
    names = {}
    for _, row in rows:
        names.update((name, None) for name, value in row.items() if value is not None)
    return list(names)


def _renamed(rows, renames, path, where):
    """Rows with columns renamed by `columns: {old: new}`; a renamed column wins over an
    existing one of the new name."""
    found = _columns(rows)
    unknown = [old for old in renames if old not in found]
    if unknown:
        named = ", ".join(f"'{old}'" for old in unknown)
        raise UserError(f"{where}: no column {named} in {path} to rename; columns found: {', '.join(found)}")

    return [(location, renamed(row, renames)) for location, row in rows]


def renamed(row, renames):
    out = {name: value for name, value in row.items() if name not in renames}
    out.update((renames[name], value) for name, value in row.items() if name in renames)
    return out


def _format_of(requested, columns, path):
    """(format, reason) for a source: the one `format:` forces, or the one its columns show."""
    found = ", ".join(columns)
    if requested != "auto":
        missing = missing_columns(requested, columns)
        if missing:
            needed = ", ".join(missing)
            raise UserError(f"{path}: format '{requested}' needs column(s) {needed}; columns found: {found}")
        return requested, "forced by format:"
    detected = detect(columns)
    if detected is None:
        raise UserError(
            f"{path}: columns {found} match no data format; rename them with `columns: {{old: new}}` "
            f"or set `format:`. Each format needs these columns:\n{describe_formats()}"
        )
    return detected


def _hold_out(train, fraction, rng, where):
    """Move a `fraction` of the train sources' rows into an eval set, which is returned."""
    total = sum(len(source.rows) for source in train)
    if total < 2:
        raise UserError(
            f"{where}: `eval: {fraction}` holds out training rows, but there is only {total}; "
            "add data or set `eval: 0`"
        )
    kept, held = mix.hold_out([list(zip(source.rows, source.locations)) for source in train], fraction, rng)
    for source, pairs in zip(train, kept):
        source.rows, source.locations = [row for row, _ in pairs], [where for _, where in pairs]
    return [row for row, _ in held]


def _mixed(sources, rng):
    """The sources' rows weighted and shuffled together; records each source's share."""
    rows = []
    for source in sources:
        used = mix.weigh(source.rows, source.weight, rng)
        source.report.used = len(used)
        rows += used
    rng.shuffle(rows)
    return rows
