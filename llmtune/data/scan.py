"""Checking the data of `data:` without holding it: what `llmtune validate` does.

The run (``load_data``) holds every row to train on it; the check reads each source row by row and keeps only
counts, the first problems of each source (``prepare.MAX_PROBLEMS``) and what the warnings need, so that its
memory does not grow with the data. It finds exactly the run's problems and warnings:

- each source is read once: its format detected (``prepare.Tally``), its rows converted under the format of its
  first row and checked against the chat template and `data.max_length` as they are read (``_Checks``, ``CHUNK``
  rows at a time; prompts rendered and tokenized in worker processes). It is read again when most of its rows
  turn out to be of another format, and the checks read every source again when the kind the sources are mixed
  into (known once all are read) is not the kind they were checked as (prompt-completion pairs mixed into
  conversations);
- the eval hold-out and the weights are counted: the hold-out draws the run's random sample of row numbers, so
  it holds the held-out numbers (not rows).

`data.curate` (duplicates and contamination need every row's text) and Hub datasets are checked the run's way.
"""

import multiprocessing
import os
import random
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice

from llmtune.data import masking, mix, templates
from llmtune.data.formats import Converter, to_kind
from llmtune.data.prepare import (
    Counted,
    Problems,
    SourceReport,
    Tally,
    load_sources,
    mixable,
    renamed,
    require_hold_out,
    trained_rows,
)
from llmtune.data.sources import stream_records
from llmtune.errors import UserError
from llmtune.tokenizer import load_tokenizer

# Rows checked against the chat template at a time: one batched tokenizer call each.
CHUNK = 1000
# Processes that render and tokenize prompts for `data.max_length`, at most one per usable core.
WORKERS = 2


@dataclass
class _Scanned:
    report: SourceReport
    records: object  # () -> iterator of (where, row) and (problem, None), afresh on each call
    spec: dict
    kind: tuple
    good: int  # rows read that convert
    rows: int  # of those, the rows left by the `data.max_length` check
    cut: str | None = None  # FILE:LINE of the first row that trains nothing at max_length (templates.py)


def streamable(data, locate) -> bool:
    """Whether `check` can read every source of `data` row by row."""
    if data.get("curate"):
        return False
    evals = data.get("eval") if isinstance(data.get("eval"), list) else []
    specs = [("train", i, spec) for i, spec in enumerate(data["train"])] + [("eval", i, s) for i, s in enumerate(evals)]
    for section, index, spec in specs:
        try:
            if stream_records(spec["path"], name=None, split=None, revision=None,
                              where=locate(("data", section, index, "path")))[1] is None:
                return False  # a Hub dataset
        except UserError:
            pass  # reported by `check` where the run reports it
    return True


def check(data, *, method, seed, locate, model=None) -> list[str]:
    """`load_data`'s problems (raised) and warnings for `data` (`streamable`), its rows read but not kept."""
    max_length = data.get("max_length")
    try:  # loaded first so that the rows are checked against it as they are read
        tokenizer = model and load_tokenizer(model)
    except UserError:
        tokenizer = None  # raised again where the run raises it: after the data's own problems
    with _Workers(tokenizer, max_length) as workers:
        checks = tokenizer and _Checks(max_length, method, model, tokenizer, locate, workers)
        problems, scan = [], partial(_scan, checks=checks)
        train = load_sources(data["train"], ("data", "train"), method, locate, problems, load=scan)
        eval_spec = data.get("eval")
        evals = load_sources(eval_spec if isinstance(eval_spec, list) else [], ("data", "eval"), method, locate,
                             problems, load=scan)
        if problems:
            raise UserError(problems)
        every = train + evals
        kind = mixable(every, locate)
        warnings = []
        if model is not None:
            if not checks or checks.stale or any(source.kind != kind for source in every):
                # the rows were checked under another format or kind than they turned out to have: again
                checks = _Checks(max_length, method, model, tokenizer or load_tokenizer(model), locate, workers)
                for source in every:
                    for rows, locations in _chunks(source, kind):
                        checks.feed(kind, source.kind, rows, locations)
                    checks.close(source)
            warnings = checks.result()
            if max_length:
                templates.require_trained(train, max_length, locate(("data", "max_length")))
    counts = [source.rows for source in train]
    if eval_spec and not evals:  # a fraction of the training rows, drawn as mix.hold_out draws them
        require_hold_out(sum(counts), eval_spec, locate(("data", "eval")))
        taken = random.Random(seed).sample(range(sum(counts)), mix.held(sum(counts), eval_spec))
        starts = [sum(counts[:i]) for i in range(len(counts))]
        counts = [count - sum(start <= n < start + count for n in taken) for start, count in zip(starts, counts)]
    used = sum(mix.weighed(count, source.spec.get("weight", 1.0)) for source, count in zip(train, counts))
    return warnings + trained_rows(used, locate)


def _scan(spec, key, method, locate, checks=None):
    """One pass over a source: its format, kind and good rows counted, its problems raised (`Counted`); its rows
    go through `checks` (a `_Checks`) as they are read, converted under the format of the first row."""
    records, _ = stream_records(spec["path"], name=spec.get("name"), split=spec.get("split", "train"),
                                revision=spec.get("revision"), where=locate(key + ("path",)))
    read, tally, converter, converted, good, chunk = Problems(), Tally(spec), None, Problems(), 0, ([], [])
    for where, row in records():
        if row is None:
            read.add([where])
            continue
        row = tally.add(where, row)
        if tally.rows == 1:  # most sources hold one format: that of their first row
            forced = spec.get("format", "auto")
            converter = Converter(forced) if forced != "auto" else \
                next((Converter(name) for name in tally.counts), None)
        if converter:
            out, bad = converter.row(where, row)
            converted.add(bad)
            good += out is not None
            if checks and out is not None:
                chunk[0].append(out)
                chunk[1].append(where)
                if len(chunk[0]) == CHUNK:
                    checks.feed(converter.kind, converter.kind, *chunk)
                    chunk = ([], [])
    if not tally.rows:  # every file empty or unreadable
        raise Counted(read.shown, read.total)
    try:
        fmt, reason = tally.format(key, method, locate)
    except UserError as error:  # this source's own problem first, then what reading found
        raise Counted(error.problems + read.shown, len(error.problems) + read.total) from None
    if converter is None or converter.name != fmt:  # most rows are of another format: read again
        if checks:
            checks.stale = True
        converter, converted, good = Converter(fmt), Problems(), 0
        for _, (out, bad) in _converted(records, spec, converter):
            converted.add(bad)
            good += out is not None
    if read or converted:
        raise Counted(read.shown + converted.shown, read.total + converted.total)
    report = SourceReport(spec["path"], fmt, reason, good, 0, None, None, [])
    source = _Scanned(report, records, spec, converter.kind, good, good)
    if checks:
        if chunk[0]:
            checks.feed(converter.kind, converter.kind, *chunk)
        checks.close(source)
    return source


def _converted(records, spec, converter):
    """(where, (converted row or None, problems)) for each row of a source, read afresh."""
    renames = spec.get("columns") or {}
    for where, row in records():
        if row is not None:
            yield where, converter.row(where, renamed(row, renames) if renames else row)


def _chunks(source, kind):
    """The source's rows converted to `kind`, with their locations, CHUNK at a time."""
    rows = ((where, out) for where, (out, _) in _converted(source.records, source.spec,
                                                           Converter(source.report.format)))
    while chunk := list(islice(rows, CHUNK)):
        yield to_kind([row for _, row in chunk], source.kind, kind), [where for where, _ in chunk]


class _Checks:
    """The run's checks against the chat template (templates.check_rendering, masking.check_rows) and
    `data.max_length` (templates.drop_cut), fed the rows of each source a chunk at a time, in order, all of one
    kind (else `stale`: the kind the sources are mixed into is known only once all are read)."""

    def __init__(self, max_length, method, model, tokenizer, locate, workers):
        self.max_length, self.method, self.model, self.tokenizer = max_length, method, model, tokenizer
        self.locate, self.workers = locate, workers
        self.kind, self.stale = None, False
        self.tried, self.refused, self.failure, self.effects, self.warnings = set(), [], None, masking.Effects(), []
        self.counted, self.pending = [0, 0, None], deque()  # this source's rows that fit, that do not, the first

    def _start(self, kind):
        self.kind = kind
        self.chat = kind[0].startswith("conversational") and bool(self.tokenizer.chat_template)
        folds = self.chat and not masking.has_system_role(self.tokenizer)
        self.prepare = masking.fold_system if folds else (lambda messages: messages)
        self.cut = self.chat and templates.cuts_turns(self.method, kind[0], self.tokenizer)

    def feed(self, kind, own, rows, locations):
        """`rows` of a source whose own kind is `own`, brought to `kind`."""
        if self.kind is None:
            self._start(kind)
        self.stale = self.stale or kind != self.kind
        if self.stale:
            return
        if self.chat:
            self.refused += templates.refused(zip(rows, locations), self.model, self.tokenizer, self.prepare,
                                              self.tried)
            if self.failure is None and not self.refused:  # else the run stops before these checks
                try:  # folds system messages in place, as the run's check does before max_length counts
                    masking.check_rows(self.tokenizer, [(rows, locations)], cut=self.cut, effects=self.effects)
                except masking.Undecomposable as err:
                    self.failure = templates.undecomposable(err, self.locate)
                except UserError as err:
                    self.failure = err
        # Rows without a prompt (plain text) and prompts that are not trained fit whatever max_length.
        if self.max_length and not own[0].endswith("prompt_only") and {"prompt", "messages"}.intersection(own[1]) \
                and self.failure is None and not self.refused:
            self.pending.append((self.workers.fits(rows), locations))
            if len(self.pending) > 2 * self.workers.count:  # a few chunks in flight: memory stays bounded
                self._count(*self.pending.popleft())

    def _count(self, result, locations):
        fit = result()
        self.counted[0] += sum(fit)
        self.counted[1] += len(fit) - sum(fit)
        if self.counted[2] is None and not all(fit):
            self.counted[2] = locations[fit.index(False)]

    def close(self, source):
        """The end of `source`'s rows: rows cut away at max_length are left out of its count."""
        while self.pending:
            self._count(*self.pending.popleft())
        left, dropped, first = self.counted
        if not self.stale:
            if dropped:
                self.warnings.append(templates.cut_warning(source.report.path, dropped, left + dropped, first,
                                                           self.max_length))
            source.rows, source.cut = source.good - dropped, first
        self.counted = [0, 0, None]

    def result(self) -> list[str]:
        """The warnings, or the UserError the run raises."""
        if self.refused:
            raise UserError(self.refused)
        if self.failure:
            raise self.failure
        chat = self.kind is not None and self.chat
        return (self.effects.warnings(self.model.get("chat_template") or self.model["name"]) if chat else []) + \
            self.warnings


class _Workers:
    """`templates.fits` of chunks of rows in up to `WORKERS` forked processes while this one reads on (rendering
    each prompt and tokenizing it are most of the check's time); in this process on one core or without fork.
    `fits(rows)` returns a callable that gives the result."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.count = min(WORKERS, cores) if "fork" in multiprocessing.get_all_start_methods() else 1
        self.pool = None

    def __enter__(self):
        if self.count > 1 and self.max_length and self.tokenizer:
            global _TOKENIZER
            _TOKENIZER = self.tokenizer  # a forked worker has it: nothing to pickle or load again
            self.pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("fork"))
        return self

    def __exit__(self, *exc):
        global _TOKENIZER
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
            _TOKENIZER = None

    def fits(self, rows):
        if self.pool:
            return self.pool.submit(_fits, rows, self.max_length).result
        return partial(templates.fits, rows, self.max_length, self.tokenizer)


_TOKENIZER = None


def _fits(rows, max_length):
    return templates.fits(rows, max_length, _TOKENIZER)
