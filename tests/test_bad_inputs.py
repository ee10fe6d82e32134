"""`validate` = run: a corpus of bad inputs (recipe values, the model, paths, data files of each format),
a fuzzer over a good recipe's values, a fuzzer over good data files of every format and container, and a
Hub that knows no id. Every case either passes both or is refused by both with the same located message,
exit 2, no traceback and no run directory.

`validate` and the training verb run in this process (hundreds of cases); the training verb stops at
its pre-flight, before any weight is loaded, for every case `validate` refuses.
"""

import csv
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmtune.cli import app
from llmtune.logs import quiet_loggers

from .conftest import RECIPES, make_recipe


def good_recipe(folder: Path, data: str = "d.jsonl", method: str = "sft", **sections) -> Path:
    """The good recipe each case spoils one way: LoRA on builtin:tiny for 2 steps, trained on `data`."""
    return make_recipe(folder, method, data={"train": [{"path": data}], "max_length": 128},
                       adapter={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                       train={"learning_rate": 3.0e-3, "max_steps": 2, "per_device_train_batch_size": 4,
                              "gradient_accumulation_steps": 1, "num_train_epochs": 1, "gradient_checkpointing": False,
                              "save_strategy": "no", "disable_tqdm": True}, seed=42, **sections)


CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
LINES = [CHAT] * 12


def jsonl(*bad, at=6):
    return "\n".join(LINES[:at] + list(bad) + LINES[at:]) + "\n"


# name: (data file name, its text, --set overrides, the text the one error must hold)
CASES = {
    # recipe values the types allow but a run cannot use
    "rank-0": ("d.jsonl", jsonl(), ["adapter.r=0"], "`adapter.r` (the LoRA rank) must be >= 1; got 0"),
    "dropout-1.5": ("d.jsonl", jsonl(), ["adapter.dropout=1.5"], "`adapter.dropout` must be in [0, 1); got 1.5"),
    "dropout-negative": ("d.jsonl", jsonl(), ["adapter.dropout=-0.1"], "must be in [0, 1)"),
    "lr-nan": ("d.jsonl", jsonl(), ["train.learning_rate=.nan"], "`train.learning_rate` must be a finite number > 0"),
    "lr-zero": ("d.jsonl", jsonl(), ["train.learning_rate=0"], "`train.learning_rate` must be a finite number > 0"),
    "lr-negative": ("d.jsonl", jsonl(), ["train.learning_rate=-1e-4"], "must be a finite number > 0; got -0.0001"),
    "batch-0": ("d.jsonl", jsonl(), ["train.per_device_train_batch_size=0"],
                "`train.per_device_train_batch_size` must be >= 1; got 0"),
    "accumulation-negative": ("d.jsonl", jsonl(), ["train.gradient_accumulation_steps=-2"],
                              "`train.gradient_accumulation_steps` must be >= 1; got -2"),
    "epochs-negative": ("d.jsonl", jsonl(), ["train.max_steps=-1", "train.num_train_epochs=-1"],
                        "`train.num_train_epochs` must be > 0"),
    "max-steps-0": ("d.jsonl", jsonl(), ["train.max_steps=0"], "`train.max_steps` must be > 0"),
    "optim-unknown": ("d.jsonl", jsonl(), ["train.optim=adamw_nope"],
                      "`train.optim`: did you mean 'adamw_torch'? expected one of: 'adamw_torch', "),
    "best-model-strategies": ("d.jsonl", jsonl(), ["train.load_best_model_at_end=true", "train.save_strategy=epoch"],
                              "SFTConfig rejected the `train:` settings: --load_best_model_at_end requires the save "
                              "and eval strategy to match"),  # the config class's own cross-field check
    "scheduler-typo": ("d.jsonl", jsonl(), ["train.lr_scheduler_type=cosin"],
                       "`train.lr_scheduler_type`: did you mean 'cosine'? expected one of: 'linear', 'cosine',"),
    "seed-negative": ("d.jsonl", jsonl(), ["seed=-1"], "`seed` must be in [0, 2**32)"),
    "seed-huge": ("d.jsonl", jsonl(), ["seed=4294967296"], "`seed` must be in [0, 2**32)"),
    "weight-nan": ("d.jsonl", jsonl(), ["data.train.0.weight=.nan"], "`weight` must be a number in (0, 1000]"),
    "weight-inf": ("d.jsonl", jsonl(), ["data.train.0.weight=.inf"], "(it multiplies the source's rows); got inf"),
    "report-to-missing": ("d.jsonl", jsonl(), ["train.report_to=[aim]"], "`train.report_to: aim` needs the aim "
                          "package, which is not installed"),
    "padding-free-without-packing": ("d.jsonl", jsonl(), ["train.padding_free=true"],
                                     "`train.padding_free: true` without packing would not cut rows to "
                                     "`data.max_length` (TRL's SFTTrainer refuses it)"),
    "prefix-checkpointing": ("d.jsonl", jsonl(), ["adapter={type: prefix, num_virtual_tokens: 8}",
                                                  "train.gradient_checkpointing=true"],
                             "which gradient checkpointing drops"),
    "flash-attention": ("d.jsonl", jsonl(), ["model.attn_implementation=flash_attention_2"], "`flash_attention_2`"),
    # the model, read on the meta device
    "target-modules": ("d.jsonl", jsonl(), ["adapter.target_modules=[nope_proj]"],
                       "the `adapter:` does not fit 'builtin:tiny': Target modules {'nope_proj'} not found"),
    "model-offline": ("d.jsonl", jsonl(), ["model.name=someone/not-cached"], "model 'someone/not-cached' is not a "
                      "folder here and not in the local Hub cache, and the Hub is offline"),
    "model-not-an-id": ("d.jsonl", jsonl(), ["model.name=no such model"],
                        "model.name: no such model: no such folder (relative to "),  # not `owner/name`: a path
    # paths
    "output-dir-proc": ("d.jsonl", jsonl(), ["output_dir=/proc/llmtune"], "'/proc/llmtune' is under /proc"),
    "output-dir-long": ("d.jsonl", jsonl(), ["output_dir=" + "x" * 300], "is too long"),
    "output-dir-file": ("d.jsonl", jsonl(), ["output_dir=d.jsonl"], "/d.jsonl' is a file, not a folder"),
    "data-looks-like-hub-id": ("d.jsonl", jsonl(), ["data.train.0.path=mydata/shopp.jsonl"],
                               "data file 'mydata/shopp.jsonl' not found"),
    # data rows
    "json-lone-surrogate": ("d.jsonl", jsonl('{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
                            [], "d.jsonl:7: invalid JSON: a lone surrogate escape"),
    "json-deep": ("d.jsonl", jsonl('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"), [],
                  "d.jsonl:7: invalid JSON: nested too deeply"),
    "json-huge-int": ("d.jsonl", jsonl('{"messages": [], "n": ' + "9" * 5000 + "}"), [],
                      "d.jsonl:7: invalid JSON: Exceeds the limit (4300 digits)"),
    "json-array-huge-int": ("d.json", "[\n" + ",\n".join(LINES[:3] + ['{"n": ' + "9" * 5000 + "}"]) + "\n]\n",
                            [], "d.json:1: invalid JSON: Exceeds the limit"),
    "max-length-cuts-every-row": ("d.jsonl", "".join(json.dumps({"prompt": "word " * 200, "completion": "x"}) + "\n"
                                                     for _ in range(12)), [],
                                  "d.jsonl:1); raise `data.max_length` or shorten the prompts"),
    "max-length-cuts-every-streamed-row": ("d.jsonl", "".join(json.dumps({"prompt": "word " * 200, "completion": "x"})
                                                              + "\n" for _ in range(12)), ["data.streaming=true"],
                                           "the prompt of each of the first 12 rows (those checked before streaming) "
                                           "fills `data.max_length: 128` tokens, so nothing would be trained (the "
                                           "first: "),
    "row-of-another-format": ("d.jsonl", jsonl(json.dumps({"prompt": "a", "completion": "b"})), [],
                              "d.jsonl:7: this row's columns ('prompt', 'completion') make it prompt_completion data, "
                              "but "),
    "streamed-row-of-another-format": ("d.jsonl", jsonl(json.dumps({"prompt": "a", "completion": "b"})),
                                       ["data.streaming=true"], "d.jsonl:7: this row's columns ('prompt', "
                                       "'completion') make it prompt_completion data, but "),
    "template-refuses-row": ("d.jsonl", jsonl(json.dumps({"messages": [{"role": "user", "content": "s"},
                                                                      *json.loads(CHAT)["messages"]]})),
                             ["model.chat_template=" + str(Path(__file__).parent / "data" / "bad" / "data" /
                                                           "alternate.jinja")],
                             "d.jsonl:7: the chat template of 'builtin:tiny' refuses this conversation (roles "
                             "user, user, assistant): Conversation roles must alternate"),
    "streamed-template-refuses-row": ("d.jsonl", jsonl(json.dumps({"messages": [{"role": "user", "content": "s"},
                                                                              *json.loads(CHAT)["messages"]]})),
                                      ["data.streaming=true", "model.chat_template=" + str(
                                          Path(__file__).parent / "data" / "bad" / "data" / "alternate.jinja")],
                                      "d.jsonl:7: the chat template of 'builtin:tiny' refuses this conversation "
                                      "(roles user, user, assistant): Conversation roles must alternate"),
    "csv-unbalanced-quote": ("d.csv", "text\n" + "\n".join(f"row {i}" if i != 100 else '"row 100'
                                                           for i in range(400)) + "\n", [],
                             "d.csv:102: a quoted field runs from line 102 to 401"),
}


def write_case(folder: Path, name: str) -> tuple[Path, list[str]]:
    data_name, text, sets, _ = CASES[name]
    (folder / data_name).write_text(text, encoding="utf-8")
    return good_recipe(folder, data_name), [arg for s in sets for arg in ("--set", s)]


quiet_loggers()  # as `llmtune` does before any verb (CliRunner calls the app, not cli.main)


def outcome(verb: str, recipe: Path, args: list[str], folder: Path) -> tuple[int, list[str]]:
    extra = ["--output-dir", str(folder / "out")] if verb != "validate" else []
    result = CliRunner().invoke(app, [verb, str(recipe), *args, *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), (verb, result.exception)
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_input_is_refused_by_validate_and_the_run_alike(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe, args = write_case(tmp_path, name)
    validated = outcome("validate", recipe, args, tmp_path)
    trained = outcome("train", recipe, args, tmp_path)
    expected = CASES[name][3]
    assert validated[0] == 2 and len(validated[1]) == 1 and expected in validated[1][0], validated
    assert trained == validated, (trained, validated)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# The fuzzer: each key of the good recipe set to each value of a list of troublemakers.
FUZZ_KEYS = ["train.learning_rate", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
             "train.num_train_epochs", "train.max_steps", "seed", "adapter.r", "adapter.alpha", "adapter.dropout",
             "data.max_length", "data.train.0.weight", "data.eval", "model.dtype", "output_dir", "train.optim",
             "train.save_strategy"]
FUZZ_VALUES = ["0", "-1", ".nan", ".inf", "-.inf", "1e400", "abc", "''", "[]", "{}", "null", "true", "0.5",
               "99999999999999999999"]
FUZZ = list(itertools.product(FUZZ_KEYS, FUZZ_VALUES))


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copy(RECIPES / "data" / "chat.jsonl", folder / "d.jsonl")
    good_recipe(folder)
    return folder


def fuzz_outcome(folder: Path, key: str, value: str) -> tuple[int, list[str]]:
    code, errors = outcome("validate", folder / "r.yaml", ["--set", f"{key}={value}"], folder)
    assert code in (0, 2), (key, value, code, errors)
    if code == 2:
        # the `--set` itself, or (a check of the whole section against the model) the section's line
        assert len(errors) == 1 and re.match(rf"error: (--set {re.escape(key)}={re.escape(value)}|r\.yaml:\d+:\d+): ",
                                             errors[0]), errors
    return code, errors


@pytest.mark.parametrize("key", FUZZ_KEYS)
def test_fuzzed_recipe_values_are_refused_with_their_location_or_accepted(key, fuzz_folder, monkeypatch):
    """Every refusal names the `--set` that caused it; the run refuses exactly what `validate` refuses."""
    monkeypatch.chdir(fuzz_folder)
    counts = {"accepted": 0, "refused": 0}
    for value in FUZZ_VALUES:
        code, errors = fuzz_outcome(fuzz_folder, key, value)
        counts["accepted" if code == 0 else "refused"] += 1
        if code == 2:  # the training verb stops at the same message, before a run directory exists
            trained = outcome("train", fuzz_folder / "r.yaml", ["--set", f"{key}={value}"], fuzz_folder)
            assert trained == (2, errors), (key, value, trained, errors)
            assert not (fuzz_folder / "out").exists()
    print(key, counts)


# Values `validate` accepts; the run must then train (a sample: these load a model and take steps).
ACCEPTED_SAMPLE = [("train.learning_rate", "0.5"), ("adapter.dropout", "0.5"), ("data.eval", "0.5"),
                   ("data.train.0.weight", "0.5"), ("train.max_steps", "-1")]


@pytest.mark.slow
@pytest.mark.parametrize("key,value", ACCEPTED_SAMPLE)
def test_fuzzed_values_validate_accepts_do_train(key, value, fuzz_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(fuzz_folder)
    assert fuzz_outcome(fuzz_folder, key, value)[0] == 0
    result = CliRunner().invoke(app, ["train", str(fuzz_folder / "r.yaml"), "--set", f"{key}={value}",
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "completed"


CORPUS = Path(__file__).parent / "data" / "bad"


def corpus_cases():
    """The hand-written corpus, less the cases about the command line itself (a verb, an option)."""
    return sorted(p.name for p in CORPUS.glob("*.yaml") if not re.search(r"^# (verb|args):", p.read_text(), re.M))


@pytest.mark.parametrize("case", corpus_cases())
def test_validate_refuses_every_corpus_case_the_run_refuses_with_the_same_message(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = outcome("train", CORPUS / case, [], tmp_path)
    assert trained[0] == 2 and trained[1], trained
    assert outcome("validate", CORPUS / case, [], tmp_path) == trained
    assert not (tmp_path / "out").exists()


class NoSuchRepo(BaseHTTPRequestHandler):
    """The Hub's answer to an id it does not know: 404, whatever the repository."""

    asked: list = []  # the paths requested

    def do_GET(self):
        self.asked.append(self.path)
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def empty_hub(monkeypatch):
    """A Hub on 127.0.0.1 that knows no repository, reachable: HF_ENDPOINT points at it, HF_HUB_OFFLINE unset."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # read when huggingface_hub was imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield url
    server.shutdown()


@pytest.mark.parametrize("key, value, message", [
    ("model.name", "me/nope", "'me/nope' is not a folder and not a model on the Hub ({hub}); give the path of a "
                              "model folder"),
    ("data.train.0.path", "mydata/shopp", "'mydata/shopp' is not a file or folder here and not a dataset on the Hub "
                                          "({hub})"),
])
def test_an_id_the_hub_does_not_know_is_refused_at_once_by_validate_and_the_run(key, value, message, empty_hub,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(jsonl(), encoding="utf-8")
    recipe = good_recipe(tmp_path, model={"name": value}) if key == "model.name" else good_recipe(tmp_path, value)
    line = next(n for n, row in enumerate(recipe.read_text().splitlines(), 1) if value in row)
    NoSuchRepo.asked.clear()
    started = time.monotonic()
    validated = outcome("validate", recipe, [], tmp_path)
    assert time.monotonic() - started < 30  # was 50 s of retries
    assert len([p for p in NoSuchRepo.asked if value in p]) == 1  # one question, no retry
    assert validated[0] == 2 and len(validated[1]) == 1, validated
    assert re.match(rf"error: r\.yaml:{line}:\d+: ", validated[1][0]), validated
    assert message.format(hub=empty_hub) in validated[1][0]
    assert outcome("train", recipe, [], tmp_path) == validated
    assert not (tmp_path / "out").exists()
    if key == "model.name":  # the same from a fresh process, where huggingface_hub reads HF_ENDPOINT itself
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        result = subprocess.run([sys.executable, "-m", "llmtune", "validate", str(recipe)], capture_output=True,
                                text=True, env=env, timeout=60)
        assert result.returncode == 2 and validated[1][0] in result.stderr.splitlines(), result.stderr


# The data fuzzer: good files of every format and container llmtune reads, each mutated one way at a time (a row's
# value, a column, a row of another format, the file itself). Every case is accepted by `validate` or refused with
# the file and, where one applies, the row's line (`FILE: row N` for JSON arrays and Parquet) in its first problem;
# `train --dry-run` says exactly the same.
ROWS = {  # format: (the method that trains on it, the good row i)
    "messages": ("sft", lambda i: {"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]}),
    "alpaca": ("sft", lambda i: {"instruction": f"Add one to {i}.", "input": "", "output": f"{i + 1}"}),
    "prompt_completion": ("sft", lambda i: {"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}),
    "text": ("sft", lambda i: {"text": f"{i} plus one is {i + 1}."}),
    "preference": ("dpo", lambda i: {"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"}),
    "kto": ("kto", lambda i: {"prompt": f"{i} + 1 =", "completion": f" {i + 1 + i % 2}", "label": i % 2 == 0}),
}
CONTAINERS = ("jsonl", "json", "csv", "parquet")
NOT_IN_CSV = ("messages", "kto")  # a CSV cell holds text: neither a list of turns nor a boolean label
BAD_ROW = 6  # the row a row mutation changes (0-based): line 7 of JSON Lines, line 8 of CSV, row 6 of the others
VALUES = {"null": None, "int": 42, "float": 1.5, "bool": True, "list": ["x"], "object": {"a": 1}, "empty": "",
          "spaces": "   ", "huge": "word " * 100_000, "deep": json.loads("[" * 60 + "]" * 60),
          "control": "a\x00b\x1b[31m", "rtl": "\u202eevil\u202c", "emoji": "🙂" * 10}
TURNS = {  # the messages format's own ways to be wrong
    "roles-reversed": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
    "no-assistant": [{"role": "user", "content": "a"}],
    "unknown-role": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}],
    "system-last": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "system", "content": "c"}],
    "turn-no-content": [{"role": "user"}, {"role": "assistant", "content": "b"}],
    "turn-content-int": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}],
    "turn-a-string": ["hello", {"role": "assistant", "content": "b"}],
    "turn-extra-key": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}],
    "two-assistants": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "assistant", "content": "c"}],
}


def row_mutations(fmt: str) -> dict:
    """name: the rows of the file, one of them changed."""
    good = ROWS[fmt][1]
    rows = [good(i) for i in range(12)]

    def changed(row):
        return rows[:BAD_ROW] + [row] + rows[BAD_ROW + 1:]

    cases = {}
    for key in rows[BAD_ROW]:
        cases[f"drop-{key}"] = changed({k: v for k, v in rows[BAD_ROW].items() if k != key})
        for name, value in VALUES.items():
            cases[f"{name}-{key}"] = changed({**rows[BAD_ROW], key: value})
    cases["extra-column"] = changed({**rows[BAD_ROW], "zzz_extra": 1})
    cases["not-an-object"] = changed(["a", "list"])
    cases["empty-object"] = changed({})
    for other in ROWS:  # one row of another format in the file
        if other != fmt:
            cases[f"row-of-{other}"] = changed(ROWS[other][1](BAD_ROW))
    if fmt == "messages":
        cases.update({name: changed({"messages": turns}) for name, turns in TURNS.items()})
    return cases


def serialize(container: str, rows: list) -> bytes | None:
    """The rows as a file of `container`; None where the container cannot hold them (a Parquet column of mixed
    types, a row that is not an object in a table)."""
    if container == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if container == "json":
        return ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n").encode()
    if not all(isinstance(r, dict) for r in rows):
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if container == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows)
        return out.getvalue().encode()
    import pyarrow
    import pyarrow.parquet

    try:  # every row gets every column (null where it has none), as Parquet writers do; not the first row's only
        table = pyarrow.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, pyarrow.ArrowNotImplementedError):
        return None
    out = io.BytesIO()
    pyarrow.parquet.write_table(table, out)
    return out.getvalue()


def file_mutations(container: str, good: bytes) -> dict:
    """name: the bytes of the good file, spoilt as a whole."""
    middle = good.index(b"\n", len(good) // 2) if container != "parquet" else len(good) // 2
    cases = {"empty-file": b"", "truncated": good[:middle - 5], "not-this-format": b"hello, world\n" * 3,
             "binary": bytes(range(256)) * 4, "one-row": serialize(container, [ROWS["text"][1](0)])}
    if container == "parquet":
        return {**cases, "zero-rows": serialize("parquet", []) or b"", "garbage-after": good + b"\x00junk"}
    return {**cases, "whitespace-only": b"\n \n\t\n", "utf8-bom": b"\xef\xbb\xbf" + good,
            "latin-1": good.replace(b"1", "\xe9".encode("latin-1"), 1) + "caf\xe9\n".encode("latin-1"),
            "crlf": good.replace(b"\n", b"\r\n"), "blank-lines": good.replace(b"\n", b"\n\n"),
            "no-final-newline": good.rstrip(b"\n"), "nul-bytes": good.replace(b"\n", b"\n\x00", 1),
            "lone-surrogate": good.replace(b'1', b'\\ud800', 1), "garbage-after": good + b"}{ not data\n"}


def data_cases() -> list:
    """(id, method, file name, bytes, where the changed row is, or None for a change to the whole file)."""
    located = {"jsonl": ":{line}", "json": ": row {row}", "csv": ":{csv}", "parquet": ": row {row}"}
    cases = []
    for fmt, (method, _) in ROWS.items():
        for container in CONTAINERS:
            if container == "csv" and fmt in NOT_IN_CSV:
                continue
            good = serialize(container, [ROWS[fmt][1](i) for i in range(12)])
            name = f"d.{container}"
            cases.append((f"{fmt}.{container}.good", method, name, good, None))
            for mutation, rows in row_mutations(fmt).items():
                body = serialize(container, rows)
                if body is not None:
                    where = name + located[container].format(line=BAD_ROW + 1, csv=BAD_ROW + 2, row=BAD_ROW)
                    cases.append((f"{fmt}.{container}.{mutation}", method, name, body, where))
            for mutation, body in file_mutations(container, good).items():
                cases.append((f"{fmt}.{container}.{mutation}", method, name, body, None))
    return cases


DATA_CASES = data_cases()
# The default tier: a fixed sample across formats, containers and mutations (every 40th case); the slow sweep
# runs the rest.
FAST_DATA = {case[0] for case in DATA_CASES[::40]}


def data_outcome(case, folder: Path) -> str:
    """Run `validate` and `train --dry-run` on one case; the outcome class, after asserting the contract."""
    ident, method, name, body, where = case
    for old in folder.iterdir():
        (shutil.rmtree if old.is_dir() else Path.unlink)(old)
    (folder / name).write_bytes(body)
    recipe = good_recipe(folder, name, method)
    validated = outcome("validate", recipe, [], folder)
    dry = outcome("train", recipe, ["--dry-run"], folder)
    assert validated == dry, (ident, validated, dry)
    assert not (folder / "out").exists() and not (folder / "runs").exists(), ident
    code, errors = validated
    assert code in (0, 2), (ident, code, errors)
    if code == 0:
        return "accepted"
    assert errors and name in errors[0], (ident, errors)  # the file, and its line where one applies
    if where is None:
        return "refused (the file)"
    assert where + ":" in errors[0], (ident, where, errors)  # the changed row is the first problem named
    other = ident.partition(".row-of-")[2]
    if other:  # a row of another format: named as one, or as a row of the file's format lacking a column
        assert f"make it {other} data" in errors[0] or ": missing '" in errors[0], (ident, errors)
    return "refused at the row"


@pytest.fixture
def one_model(monkeypatch):
    """The data sweeps spoil data files only: the model's shape, built on the meta device by every `validate` and
    pre-flight (most of a case's time), is the same in every case, so it is built once per model and adapter."""
    from llmtune.runner import preflight

    shapes, build = {}, preflight.model_shape

    def shape(config, head="CausalLM"):
        key = json.dumps([config["model"], config.get("adapter"), head], sort_keys=True, default=str)
        if key not in shapes:
            shapes[key] = build(config, head)
        return shapes[key]

    monkeypatch.setattr(preflight, "model_shape", shape)


def sweep(cases, folder: Path) -> dict:
    counts: dict = {}
    for case in cases:
        kind = data_outcome(case, folder)
        counts[kind] = counts.get(kind, 0) + 1
        if case[0].endswith(".good"):
            assert kind == "accepted", case[0]
    print(counts)
    return counts


def test_fuzzed_data_files_are_accepted_or_refused_at_their_file_and_row(tmp_path, monkeypatch, one_model):
    monkeypatch.chdir(tmp_path)
    counts = sweep([c for c in DATA_CASES if c[0] in FAST_DATA], tmp_path)
    assert len(counts) == 3, counts  # the sample has each outcome


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(ROWS))
def test_fuzzed_data_files_of_every_format_and_container(fmt, tmp_path, monkeypatch, one_model):
    monkeypatch.chdir(tmp_path)
    sweep([c for c in DATA_CASES if c[0].startswith(fmt + ".") and c[0] not in FAST_DATA], tmp_path)


# Oddities `validate` accepts; the run must then train on them (a sample: these load a model and take steps).
TRAINED_SAMPLE = ["messages.jsonl.crlf", "messages.jsonl.two-assistants", "alpaca.csv.utf8-bom", "text.json.huge-text",
                  "prompt_completion.parquet.extra-column", "preference.jsonl.rtl-chosen", "kto.parquet.control-completion"]


@pytest.mark.slow
@pytest.mark.parametrize("ident", TRAINED_SAMPLE)
def test_fuzzed_data_files_validate_accepts_do_train(ident, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_outcome(next(c for c in DATA_CASES if c[0] == ident), tmp_path) == "accepted"
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml"), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, (result.stderr, result.exception)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["train_loss"] > 0
