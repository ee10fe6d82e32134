"""`validate` = run: a corpus of bad inputs (recipe values, the model, paths, data files of each format)
and a small fuzzer over a good recipe. Every case either passes both or is refused by both with the
same one located message, exit 2, no traceback and no run directory.

`validate` and the training verb run in this process (hundreds of cases); the training verb stops at
its pre-flight, before any weight is loaded, for every case `validate` refuses.
"""

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

from .conftest import RECIPES

GOOD = """\
method: sft
model: {name: "builtin:tiny", dtype: float32}
adapter: {type: lora, r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
data:
  train:
    - path: DATA
  max_length: 128
train:
  learning_rate: 3.0e-3
  max_steps: 2
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  num_train_epochs: 1
  gradient_checkpointing: false
  save_strategy: "no"
  disable_tqdm: true
seed: 42
"""

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
    "seed-negative": ("d.jsonl", jsonl(), ["seed=-1"], "`seed` must be in [0, 2**32)"),
    "seed-huge": ("d.jsonl", jsonl(), ["seed=4294967296"], "`seed` must be in [0, 2**32)"),
    "weight-nan": ("d.jsonl", jsonl(), ["data.train.0.weight=.nan"], "`weight` must be a number in (0, 1000]"),
    "weight-inf": ("d.jsonl", jsonl(), ["data.train.0.weight=.inf"], "(it multiplies the source's rows); got inf"),
    "report-to-missing": ("d.jsonl", jsonl(), ["train.report_to=[aim]"], "`train.report_to: aim` needs the aim "
                          "package, which is not installed"),
    "flash-attention": ("d.jsonl", jsonl(), ["model.attn_implementation=flash_attention_2"], "`flash_attention_2`"),
    # the model, read on the meta device
    "target-modules": ("d.jsonl", jsonl(), ["adapter.target_modules=[nope_proj]"],
                       "the `adapter:` does not fit 'builtin:tiny': Target modules {'nope_proj'} not found"),
    "model-offline": ("d.jsonl", jsonl(), ["model.name=someone/not-cached"], "model 'someone/not-cached' is not a "
                      "folder here and not in the local Hub cache, and the Hub is offline"),
    "model-not-an-id": ("d.jsonl", jsonl(), ["model.name=no such model"], "is neither a folder nor a Hub model id"),
    # paths
    "output-dir-proc": ("d.jsonl", jsonl(), ["output_dir=/proc/llmtune"], "'/proc/llmtune' is under /proc"),
    "output-dir-long": ("d.jsonl", jsonl(), ["output_dir=" + "x" * 300], "is too long"),
    "output-dir-file": ("d.jsonl", jsonl(), ["output_dir=d.jsonl"], "'d.jsonl' is a file, not a folder"),
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
    "template-refuses-row": ("d.jsonl", jsonl(json.dumps({"messages": [{"role": "user", "content": "s"},
                                                                      *json.loads(CHAT)["messages"]]})),
                             ["model.chat_template=" + str(Path(__file__).parent / "data" / "bad" / "data" /
                                                           "alternate.jinja")],
                             "d.jsonl:7: the chat template of 'builtin:tiny' refuses this conversation (roles "
                             "user, user, assistant): Conversation roles must alternate"),
    "csv-unbalanced-quote": ("d.csv", "text\n" + "\n".join(f"row {i}" if i != 100 else '"row 100'
                                                           for i in range(400)) + "\n", [],
                             "d.csv:102: a quoted field runs from line 102 to 401"),
}


def write_case(folder: Path, name: str) -> tuple[Path, list[str]]:
    data_name, text, sets, _ = CASES[name]
    (folder / data_name).write_text(text, encoding="utf-8")
    recipe = folder / "r.yaml"
    recipe.write_text(GOOD.replace("DATA", data_name), encoding="utf-8")
    return recipe, [arg for s in sets for arg in ("--set", s)]


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
             "data.max_length", "data.train.0.weight", "data.eval", "model.dtype", "output_dir"]
FUZZ_VALUES = ["0", "-1", ".nan", ".inf", "-.inf", "1e400", "abc", "''", "[]", "{}", "null", "true", "0.5",
               "99999999999999999999"]
FUZZ = list(itertools.product(FUZZ_KEYS, FUZZ_VALUES))


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copy(RECIPES / "data" / "chat.jsonl", folder / "d.jsonl")
    (folder / "r.yaml").write_text(GOOD.replace("DATA", "d.jsonl"), encoding="utf-8")
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
    text = GOOD.replace("DATA", "d.jsonl").replace("builtin:tiny", value) if key == "model.name" else \
        GOOD.replace("DATA", value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    line = next(n for n, row in enumerate(text.splitlines(), 1) if value in row)
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
