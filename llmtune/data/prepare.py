"""What reading a source whole and reading it as a stream share: the reports, a source's format
detection and checks, and weighting sources together (used by __init__.py and stream.py)."""

from collections import Counter
from dataclasses import dataclass, field

from llmtune.data import mix
from llmtune.data.formats import (
    common_kind,
    convert,
    describe_formats,
    describe_kind,
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


class Problems:
    """A source's problems found row by row: the first MAX_PROBLEMS kept, the rest counted (data/scan.py)."""

    def __init__(self):
        self.shown, self.total = [], 0

    def add(self, problems):
        self.shown += problems[:MAX_PROBLEMS - len(self.shown)]
        self.total += len(problems)

    def __bool__(self):
        return self.total > 0


class Counted(UserError):
    """A source's problems as `Problems` kept them: `total` counts those not kept."""

    def __init__(self, problems, total):
        super().__init__(problems)
        self.total = total


def load_sources(specs, key, method, locate, problems, load=None):
    """The sources that `load` (default: read whole) cleanly; the problems of the others go into `problems`."""
    loaded = []
    for index, spec in enumerate(specs):
        try:
            loaded.append((load or _load_source)(spec, key + (index,), method, locate))
        except UserError as error:
            total = getattr(error, "total", len(error.problems))
            problems += error.problems[:MAX_PROBLEMS]
            if total > MAX_PROBLEMS:
                problems.append(f"... and {total - MAX_PROBLEMS} more problems in {spec['path']}")
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
    if not rows:  # every file empty or unreadable: nothing to detect a format from
        raise UserError(problems)
    tally = Tally(spec)
    rows = [(where, tally.add(where, row)) for where, row in rows]
    try:
        fmt, reason = tally.format(key, method, locate)
    except UserError as error:  # this source's own problem first, then what reading found
        raise UserError(error.problems + problems) from None
    converted, kind, row_problems = convert(rows, fmt)
    if problems or row_problems:
        raise UserError(problems + row_problems)
    return rows, fmt, reason, (converted, kind)


class Tally:
    """What deciding a source's format needs of its rows, counted one row at a time: the columns found, before
    and after `columns:` renames (a column null in every row is absent: Parquet and Hub tables give every row
    every column), how many rows show each format on their own, and the first row of each."""

    def __init__(self, spec):
        self.spec, self.renames = spec, spec.get("columns") or {}
        self.found, self.columns = {}, {}  # names in order of first appearance, before and after renaming
        self.counts = Counter()  # in order of first appearance: a tie goes to the first row's format
        self.first = {}  # format -> (index, FILE:LINE) of its first row
        self.rows = 0

    def add(self, where, row):
        """Count `row`; return it renamed."""
        self.found.update((name, None) for name, value in row.items() if value is not None)
        if self.renames:
            row = renamed(row, self.renames)
            self.columns.update((name, None) for name, value in row.items() if value is not None)
        shown = row_format(row)
        if shown:
            self.counts[shown] += 1
            self.first.setdefault(shown, (self.rows, where))
        self.rows += 1
        return row

    def format(self, key, method, locate):
        """(format, reason) of the source, or a UserError naming what is wrong."""
        path = self.spec["path"]
        found = list(self.found)
        unknown = [old for old in self.renames if old not in self.found]
        if unknown:
            named = ", ".join(f"'{old}'" for old in unknown)
            raise UserError(f"{locate(key + ('columns',))}: no column {named} in {path} to rename; columns found: "
                            f"{', '.join(found)}")
        fmt, reason = self._format_of(self.spec.get("format", "auto"), path)
        accepted = METHODS[method].formats
        if fmt not in accepted:
            raise UserError(
                f"{path}: method '{method}' cannot train on '{fmt}' data; it needs one of: {', '.join(accepted)}"
            )
        return fmt, reason

    def _format_of(self, requested, path):
        """(format, reason): the one `format:` forces, or the one most of the rows show on their own (a stray row
        of another format is refused by its location rather than deciding the source's format)."""
        columns = list(self.columns if self.renames else self.found)
        found = ", ".join(columns)
        if requested != "auto":
            missing = missing_columns(requested, columns)
            if missing:
                needed = ", ".join(missing)
                raise UserError(f"{path}: format '{requested}' needs column(s) {needed}; columns found: {found}")
            return requested, "forced by format:"
        if not self.counts:  # no row is a format on its own: the columns together name one whose rows say what they lack
            detected = detect(columns)
            if detected is None:
                raise UserError(
                    f"{path}: columns {found} match no data format; rename them with `columns: {{old: new}}` "
                    f"or set `format:`. Each format needs these columns:\n{describe_formats()}"
                )
            return detected
        fmt = max(self.counts, key=self.counts.get)
        strays = [(self.first[name], name) for name in self.counts if foreign(name, fmt)]
        if strays:
            (_, where), other = min(strays)
            among = f"{self.counts[fmt]} of the {self.rows} rows read, the first at {self.first[fmt][1]}"
            raise UserError(f"{where}: {stray_row(other, fmt, path, among)}")
        return fmt, detected_by(fmt)


def renamed(row, renames):
    out = {name: value for name, value in row.items() if name not in renames}
    out.update((renames[name], value) for name, value in row.items() if name in renames)
    return out


def mixable(sources, locate):
    """The kind every source is brought to; refuses sources that cannot be mixed."""
    kind = common_kind(source.kind for source in sources)
    if kind is None:
        listed = ", ".join(f"{source.report.path} is {describe_kind(source.kind)}" for source in sources)
        raise UserError(f"{locate(('data', 'train'))}: data sources of different shapes cannot be mixed: {listed}")
    return kind


def require_hold_out(total, fraction, where):
    if total < 2:
        raise UserError(
            f"{where}: `eval: {fraction}` holds out training rows, but there is only {total}; "
            "add data or set `eval: 0`"
        )


def trained_rows(count, locate):
    """Refuses a training set weighted down to nothing; the warning on a small one."""
    if not count:
        raise UserError(f"{locate(('data', 'train'))}: no training rows are left after weighting; raise a `weight:`")
    if count < MIN_TRAIN_ROWS:
        return [f"the training set has {count} row(s), fewer than {MIN_TRAIN_ROWS}: the model will learn little "
                "from it"]
    return []


def mixed(sources, rng):
    """The sources' rows weighted and shuffled together; records each source's share."""
    rows = []
    for source in sources:
        used = mix.weigh(source.rows, source.weight, rng)
        source.report.used = len(used)
        rows += used
    rng.shuffle(rows)
    return rows
