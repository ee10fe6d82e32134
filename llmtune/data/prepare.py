"""What reading a source whole and reading it as a stream share: the reports, a source's format
detection and checks, and weighting sources together (used by __init__.py and stream.py)."""

from collections import Counter
from dataclasses import dataclass, field

from llmtune.data import mix
from llmtune.data.formats import (
    convert,
    describe_formats,
    detect,
    detected_by,
    foreign,
    missing_columns,
    row_format,
    stray_row,
)
from llmtune.data.sources import read_source
from llmtune.errors import UserError
from llmtune.verbs import METHODS

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


def load_sources(specs, key, method, locate, problems, load=None):
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
        fmt, reason = _format_of(spec.get("format", "auto"), rows, path)
        accepted = METHODS[method].formats
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


def _format_of(requested, rows, path):
    """(format, reason) for a source: the one `format:` forces, or the one most of its rows show on their own (a
    stray row of another format is refused by its location rather than deciding the source's format)."""
    columns = _columns(rows)
    found = ", ".join(columns)
    if requested != "auto":
        missing = missing_columns(requested, columns)
        if missing:
            needed = ", ".join(missing)
            raise UserError(f"{path}: format '{requested}' needs column(s) {needed}; columns found: {found}")
        return requested, "forced by format:"
    shown = [row_format(row) for _, row in rows]
    counts = Counter(filter(None, shown))
    if not counts:  # no row is a format on its own: the columns together name one whose rows say what they lack
        detected = detect(columns)
        if detected is None:
            raise UserError(
                f"{path}: columns {found} match no data format; rename them with `columns: {{old: new}}` "
                f"or set `format:`. Each format needs these columns:\n{describe_formats()}"
            )
        return detected
    fmt = max(counts, key=counts.get)  # the most rows' format; on a tie, the first row's
    strays = [(where, name) for (where, _), name in zip(rows, shown) if foreign(name, fmt)]
    if strays:
        where, other = strays[0]
        among = f"{counts[fmt]} of the {len(rows)} rows read, the first at {rows[shown.index(fmt)][0]}"
        raise UserError(f"{where}: {stray_row(other, fmt, path, among)}")
    return fmt, detected_by(fmt)


def mixed(sources, rng):
    """The sources' rows weighted and shuffled together; records each source's share."""
    rows = []
    for source in sources:
        used = mix.weigh(source.rows, source.weight, rng)
        source.report.used = len(used)
        rows += used
    rng.shuffle(rows)
    return rows
