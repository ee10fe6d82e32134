"""Reading a data source: a local file, folder or glob, or a Hugging Face Hub dataset.

Every row comes back with where it was found, so that a problem found later can point at
it: ``FILE:LINE`` for JSON Lines and CSV (the CSV header is line 1), ``FILE: row N`` for
JSON and Parquet, N counting from 0 like ``dataset[N]``. Reading never stops at the first
bad line: every problem in the file is collected.
"""

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass

from llmtune.errors import UserError
from llmtune.files import not_on_hub

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_EXTENSION_LIST = ", ".join(EXTENSIONS)


@dataclass
class Read:
    rows: list  # (where, row dict) pairs
    problems: list
    files: list  # local files read, as the user would name them
    sha256: str | None = None
    revision: str | None = None


def json_type(value):
    """A value's type in JSON's words, since that is what users write their data in."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_source(path, *, name, split, revision, where):
    """All rows of one source.

    Problems with the path itself, such as a file not found, are raised prefixed with
    `where`, the recipe location of `path`; problems with the data are returned.
    """
    files = _local_files(path, where)
    if files is None:
        return _read_hub(path, name, split, revision, where)
    rows, problems = [], []
    for where, row in records(files):
        if row is None:
            problems.append(where)
        else:
            rows.append((where, row))
    return Read(rows, problems, [shown for shown, _ in files], sha256_files([real for _, real in files]))


def records(files):
    """(where, row) for each row of local `files` ((shown, real) pairs), read lazily, and
    (problem, None) for each problem, an empty file included."""
    for shown, real in files:
        found = False
        try:
            reader = _READERS[os.path.splitext(real)[1].lower()] if os.path.getsize(real) else None
            for found, record in enumerate(reader(real, shown) if reader else (), 1):
                yield record
        except UnicodeDecodeError:
            yield (f"{shown}:{_first_undecodable_line(real)}: not UTF-8 text (binary data, or another encoding); "
                   "save the file as UTF-8"), None
        except csv.Error as error:
            yield f"{shown}: cannot read the file: {error}", None
        else:
            if not found:
                yield f"{shown}: file has no rows; add rows to it or remove it from `data:`", None


def _first_undecodable_line(real):
    with open(real, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def local_fingerprint(path, where):
    """sha256 over a local source's file names and bytes, or None for a Hub dataset id."""
    files = _local_files(path, where)
    if files is None:
        return None
    return sha256_files([real for _, real in files]) + ":" + ",".join(shown for shown, _ in files)


def _supported(file_name):
    return os.path.splitext(file_name)[1].lower() in EXTENSIONS


def _local_files(path, where):
    """(shown, real) paths of the files a local source names, or None for a Hub dataset id."""
    real = os.path.expanduser(path)
    if os.path.isdir(real):
        names = sorted(n for n in os.listdir(real) if _supported(n) and os.path.isfile(os.path.join(real, n)))
        if not names:
            raise UserError(f"{where}: folder '{path}' has no {_EXTENSION_LIST} files")
        return [(os.path.join(path, n), os.path.join(real, n)) for n in names]
    if os.path.isfile(real):
        if not _supported(real):
            raise UserError(f"{where}: cannot read '{path}': data files must be {_EXTENSION_LIST}")
        return [(path, real)]
    if any(char in path for char in "*?["):
        matches, seen = [], set()
        for m in sorted(glob.glob(real, recursive=True)):
            # `**` follows symlinks, a loop included: each file is read once, under its first name
            if _supported(m) and os.path.isfile(m) and os.path.realpath(m) not in seen:
                seen.add(os.path.realpath(m))
                matches.append(m)
        if not matches:
            raise UserError(f"{where}: no {_EXTENSION_LIST} files match '{path}'")
        return [(m, m) for m in matches]
    if os.path.exists(real):  # a device, a pipe, a socket: nothing to read rows from
        raise UserError(f"{where}: cannot read '{path}': it is neither a file nor a folder")
    if path.startswith((".", "/", "~")) or _supported(path):
        raise UserError(f"{where}: data file '{path}' not found; a relative path in a recipe is relative to the "
                        "recipe's folder")
    return None


def sha256_files(paths):
    """One digest over the files' bytes in order: for a single file it equals `sha256sum FILE`.

    Kept for the process by the files' paths, sizes and modification times: the cache key and the
    run's record both need it, and each file is read for it only once."""
    stamp = tuple((os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = _hash_files(paths)
    return _DIGESTS[stamp]


_DIGESTS: dict = {}


def _hash_files(paths):
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _invalid_json(where, error):
    return f"{where}: invalid JSON: {error.msg} (column {error.colno})"


def _parse_json(text, where):
    """(value, None) or (None, problem): what Python's parser takes but no row can be, said with `where`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, _invalid_json(where(error.lineno), error)
    except RecursionError:
        return None, f"{where(1)}: invalid JSON: nested too deeply (thousands of `[` or `{{`)"
    except ValueError as error:  # an integer of more than 4300 digits
        return None, f"{where(1)}: invalid JSON: {str(error).split(';')[0]}"
    if "\\u" in text and "\\ud" in text.lower():  # cheap test first: escapes are rare
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, (f"{where(1)}: invalid JSON: a lone surrogate escape (`\\ud800`-`\\udfff` without its "
                          "pair) is not a character; fix the text's encoding")
    return value, None


def _jsonl_records(real, shown):
    with open(real, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            value, problem = _parse_json(line, lambda _, number=number: f"{shown}:{number}")
            if problem:
                yield problem, None
                continue
            yield _object(f"{shown}:{number}", value)


def _json_records(real, shown):
    """A JSON array is parsed whole: only JSON Lines, CSV and Parquet files stream."""
    with open(real, encoding="utf-8-sig") as f:
        text = f.read()
    if not text.strip():
        return
    data, problem = _parse_json(text, lambda line: f"{shown}:{line}")
    if problem:
        yield problem, None
        return
    if not isinstance(data, list):
        yield f"{shown}: expected a JSON array of objects, got {json_type(data)} (one object per line is .jsonl)", None
        return
    for index, value in enumerate(data):
        yield _object(f"{shown}: row {index}", value)


# Python's default (128 KiB) refuses long documents in one field; this still stops a runaway quote at some point.
CSV_FIELD_LIMIT = 64 * 2**20


def _csv_records(real, shown):
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(real, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        line = reader.line_num  # a record, the header included, may span several lines
        rows, spanning = 0, None
        for record in reader:
            where, start, line = f"{shown}:{line + 1}", line + 1, reader.line_num
            if not record:  # a blank line
                continue
            rows += 1
            if spanning is None and line > start:
                spanning = (start, line)
            if len(record) != len(header):
                yield (f"{where}: {len(record)} fields, but the header has {len(header)}; quote fields "
                       "that hold commas or line breaks"), None
                continue
            yield where, dict(zip(header, record))
        # Quoted line breaks are legal; a file read as far fewer rows than lines has an unbalanced `"`.
        if spanning and line > 2 * (rows + 1):
            yield (f"{shown}:{spanning[0]}: a quoted field runs from line {spanning[0]} to {spanning[1]}, and the "
                   f"file's {line} lines read as only {rows} rows: an unbalanced `\"` swallows the rows after it; "
                   "close the quote (a `\"` inside a quoted field is written `\"\"`)"), None


def _parquet_records(real, shown):
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(real).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{shown}: row {index}", row
                index += 1
    except pyarrow.ArrowException as error:
        yield f"{shown}: not a readable Parquet file: {error}", None


def _object(where, value):
    if isinstance(value, dict):
        return where, value
    return f"{where}: expected a JSON object, got {json_type(value)}", None


# Each reader yields (where, row) for a good row and (problem, None) for a bad one, lazily.
_READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records, ".parquet": _parquet_records}


def stream_records(path, *, name, split, revision, where):
    """`records()` of a source: its rows read lazily, afresh on each call; and its files as
    (shown, real) paths (None for a Hub dataset, streamed at `revision`)."""
    files = _local_files(path, where)
    if files is not None:
        return (lambda: records(files)), files

    def hub():
        import datasets

        try:
            table = datasets.load_dataset(path, name, split=split, revision=revision, streaming=True)
            yield from ((f"{path}: row {index}", row) for index, row in enumerate(table))
        except (OSError, ValueError) as error:  # unknown id, split or config, no network, no access
            raise UserError(f"{where}: cannot stream Hub dataset '{path}': {error}") from error

    return hub, None


def _read_hub(path, name, split, revision, where):
    """A Hub dataset, pinned to the commit the revision resolves to, so the run records
    exactly what it trained on."""
    import datasets
    from huggingface_hub import HfApi, constants

    try:
        commit = HfApi().dataset_info(path, revision=revision).sha
        table = datasets.load_dataset(path, name, split=split, revision=commit)
    except (OSError, ValueError) as error:  # unknown id, split or config, no network, no access
        if not_on_hub(error):
            raise UserError(f"{where}: '{path}' is not a file or folder here and not a dataset on the Hub "
                            f"({constants.ENDPOINT}); a relative path is looked up next to the recipe, then in the "
                            "working directory") from None
        raise UserError(f"{where}: cannot load Hub dataset '{path}': {error}") from error
    if not len(table):
        raise UserError(f"{where}: split '{split}' of Hub dataset '{path}' has no rows")
    rows = [(f"{path}: row {index}", row) for index, row in enumerate(table.to_list())]
    return Read(rows, [], [], revision=commit)
