"""`data.streaming: true`: training sources read as the trainer consumes them, for data
larger than memory.

Before training only the head of each source is read (``CHECK_ROWS`` rows): enough to
detect its format and check those rows (rows cut away by `data.max_length` are counted, and
a head with none left is refused; conversations are checked against the chat template as
whole data is), which is all `llmtune validate` reads too. Later rows are checked and converted
as they stream (system messages folded; role sequences the template refuses, tool calls it does not render,
conversations that cannot be cut into turns), and a bad one
stops the run naming its file and line. Several sources are interleaved at random, each giving a share of the rows
proportional to its `weight` (a source that runs out starts again until every source has
run out once); a seeded buffer of ``SHUFFLE_BUFFER`` rows shuffles them, the same way on
every pass, so a resumed run skips exactly the rows it trained on. Eval sources are small
and read whole. Nothing is cached: the point is not to copy the data.
"""

import itertools
import random
from dataclasses import dataclass

from llmtune.data import masking, templates
from llmtune.data.formats import convert, describe_kind, foreign, row_format, stray_row, to_kind
from llmtune.data.prepare import PreparedData, SourceReport, detected, load_sources, mixable, renamed
from llmtune.data.prepare import mixed as mixed_whole
from llmtune.data.sources import sha256_files, stream_records
from llmtune.errors import StreamedRowError, UserError
from llmtune.tokenizer import load_tokenizer

CHECK_ROWS = 1000
SHUFFLE_BUFFER = 10_000


@dataclass
class _Stream:
    report: SourceReport
    records: object  # () -> iterator of (where, row) and (problem, None)
    real_files: list  # local paths to hash; empty for a Hub dataset
    spec: dict
    rows: list  # the head: the first rows, converted; they give the dataset's features
    kind: tuple
    locations: list  # FILE:LINE of each row of the head
    cut: str | None = None  # FILE:LINE of the head's first row that trains nothing at max_length (templates.py)
    template: tuple | None = None  # (model, tokenizer, its system role?, cut into turns?, tried, locate): `_templated`


def check(data, *, method, locate, model=None) -> list[str]:
    """Raise UserError for problems in the heads of the train sources or in the eval sources; else their warnings."""
    return _open_all(data, method, locate, model)[3]


def load(data, *, method, seed, locate, model=None):
    import datasets

    streams, evals, kind, warnings = _open_all(data, method, locate, model)
    sample = next(stream for stream in streams if stream.rows)  # a head may be all cut away at max_length
    features = datasets.Dataset.from_list(to_kind(sample.rows, sample.kind, kind)).features
    for stream in streams:
        if stream.real_files:  # one pass over the bytes, no parsing: the manifest records what was read
            stream.report.sha256 = sha256_files(stream.real_files)
    # One generator mixes and shuffles: datasets' own shuffle of a generator costs a thread
    # hand-off per row (5x slower). A tuple, because datasets splits list arguments into shards.
    train = datasets.IterableDataset.from_generator(
        _mixed, features=features, gen_kwargs={"streams": tuple(streams), "target": kind, "seed": seed})
    eval_set = None
    if evals:
        eval_set = datasets.Dataset.from_list(mixed_whole(evals, random.Random(seed)), features=features)
    return PreparedData(train, eval_set, kind[0], [s.report for s in streams] + [s.report for s in evals], warnings)


def _open_all(data, method, locate, model):
    """The train streams (their heads read and checked), the eval sources, their common kind and the warnings;
    `model` (the recipe's `model:`) gives the tokenizer that rows cut away by `data.max_length` are counted with."""
    problems = []
    streams = load_sources(data["train"], ("data", "train"), method, locate, problems, load=_open)
    evals = load_sources(data.get("eval") or [], ("data", "eval"), method, locate, problems)
    if problems:
        raise UserError(problems)
    kind = mixable(streams + evals, locate)
    for source in evals:
        source.rows = to_kind(source.rows, source.kind, kind)
    warnings, max_length = [], data.get("max_length")
    if model is not None:
        tokenizer, tried = load_tokenizer(model), set()
        warnings = templates.check_template(streams + evals, kind[0], method, model, tokenizer, locate, tried)
        if kind[0].startswith("conversational") and tokenizer.chat_template:
            for stream in streams:  # the rows after the head go through the same checks as they are read
                stream.template = (model, tokenizer, masking.has_system_role(tokenizer),
                                   templates.cuts_turns(method, kind[0], tokenizer), tried, locate)
    if model is not None and max_length:
        checked = sum(len(stream.rows) for stream in streams)
        warnings += templates.drop_cut(streams, max_length, tokenizer, streamed=True) + \
            templates.drop_cut(evals, max_length, tokenizer)
        templates.require_trained(streams, max_length, locate(("data", "max_length")), checked)
    return streams, evals, kind, warnings


def _open(spec, key, method, locate):
    records, files = stream_records(spec["path"], name=spec.get("name"), split=spec.get("split", "train"),
                                    revision=spec.get("revision"), where=locate(key + ("path",)))
    head = list(itertools.islice(records(), CHECK_ROWS))
    rows = [(where, row) for where, row in head if row is not None]
    _, fmt, reason, (converted, kind) = detected(
        spec, rows, [where for where, row in head if row is None], key, method, locate)
    # Rows and files are unknown until the stream is read: None says "not counted", not zero.
    report = SourceReport(spec["path"], fmt, reason, None, None, None, spec.get("revision"),
                          [shown for shown, _ in files or []])
    return _Stream(report, records, [real for _, real in files or []], spec, converted, kind,
                   [where for where, _ in rows])


def _mixed(streams, target, seed):
    """Rows drawn from the streams at random in proportion to their weights, through a
    shuffle buffer; a stream that runs out starts again until each has run out once."""
    rng = random.Random(seed)
    weights = [stream.spec.get("weight", 1.0) for stream in streams]
    readers = [_rows(stream, target) for stream in streams]
    finished, buffer = set(), []
    while True:
        pick = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
        row = next(readers[pick], None)
        if row is None:
            finished.add(pick)
            if len(finished) == len(streams):
                break
            readers[pick] = _rows(streams[pick], target)
            row = next(readers[pick])
        if len(buffer) < SHUFFLE_BUFFER:
            buffer.append(row)
        else:
            slot = rng.randrange(SHUFFLE_BUFFER)
            yield buffer[slot]
            buffer[slot] = row
    rng.shuffle(buffer)
    yield from buffer


def _rows(stream, target):
    """The stream's rows converted to `target`; the first bad row raises with its location."""
    renames, fmt = stream.spec.get("columns") or {}, stream.report.format
    detected = stream.spec.get("format", "auto") == "auto"
    for where, row in stream.records():
        if row is None:
            raise StreamedRowError(where)
        row = renamed(row, renames)
        other = row_format(row) if detected else None
        if foreign(other, fmt):
            raise StreamedRowError(f"{where}: {stray_row(other, fmt, stream.spec['path'], 'the rows before it')}")
        converted, kind, problems = convert([(where, row)], fmt)
        if not problems and kind != stream.kind:
            problems = [f"{where}: row is {describe_kind(kind)} but the rows before it are "
                        f"{describe_kind(stream.kind)}; one source must hold one kind of row"]
        if problems:
            raise StreamedRowError(problems)
        row = to_kind(converted, kind, target)[0]
        yield _templated(row, where, stream.template) if stream.template else row


def _templated(row, where, template):
    """A row after the head as the head's rows are checked (templates.check_template): a role sequence the template
    refuses, tool calls it does not render and (where turns are cut out of the rendering) a conversation it cannot
    cut stop the run at the row; a system message is folded where the template has no system role."""
    model, tokenizer, system, cut, tried, locate = template
    problems = templates.refused([(row, where)], model, tokenizer, (lambda m: m) if system else masking.fold_system,
                                 tried)
    rows = [row]
    if not problems:
        try:
            # What the template does to rows was counted on the head: no more looking (Effects.look renders).
            masking.check_rows(tokenizer, [(rows, [where])], cut=cut, fold=not system,
                               effects=masking.Effects(rows=masking.EFFECT_ROWS))
        except masking.Undecomposable as err:
            problems = templates.undecomposable(err, locate).problems
        except UserError as err:
            problems = err.problems
    if problems:
        raise StreamedRowError(problems)
    return rows[0]


def head(dataset, rows: int):
    """The first `rows` rows of a stream, as a Dataset (what `plan` and `data inspect` measure)."""
    import datasets

    return datasets.Dataset.from_list(list(itertools.islice(dataset, rows)), features=dataset.features)
