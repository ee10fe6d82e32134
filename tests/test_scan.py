"""`llmtune validate` checks data row by row (data/scan.py): the run's problems and warnings, without the rows."""

import json
import tracemalloc
from pathlib import Path

import pytest

from llmtune.data import load_data, scan
from llmtune.errors import UserError

from .conftest import CHAT, write_jsonl

ALTERNATE = Path(__file__).parent / "data" / "bad" / "data" / "alternate.jinja"
CHAT_ROWS = [json.loads(line) for line in CHAT.read_text().splitlines()]


def chat(i, user="What is 2+2?"):
    return {"messages": [{"role": "user", "content": f"{user} ({i})"}, {"role": "assistant", "content": "4"}]}


def where(key):
    return "recipe.yaml:" + ".".join(map(str, key))


def outcome(check, data, method, model):
    """(warnings, None) or (None, problems) of one way of checking `data`."""
    try:
        return check(data, method=method, seed=0, locate=where, model=model), None
    except UserError as err:
        return None, err.problems


def whole(data, **kwargs):
    return load_data(data, store=False, **kwargs).warnings


TINY = {"name": "builtin:tiny", "trust_remote_code": False}
# name -> (files' rows or text, the `data:` section beyond its train files, method, model, what the check says)
CASES = {
    "more problems than are shown": (
        [[*CHAT_ROWS[:3], *("{broken" for _ in range(12)), *({"messages": "no"} for _ in range(15))]], {}, "sft",
        None, "... and 7 more problems in"),
    "a stray row first, most rows of another format": (
        [[{"prompt": "a", "completion": "b"}, *CHAT_ROWS]], {}, "sft", TINY, "make it prompt_completion data"),
    "the first row lacks what the others have": (
        [[{"prompt": "a", "completion": "b"}, *({"prompt": "q", "completion": "c", "label": i % 2 == 0}
                                               for i in range(5))]], {}, "kto", None, "missing 'label'"),
    "an unknown column to rename": ([CHAT_ROWS], {"train": [{"columns": {"nope": "text"}}]}, "sft", None,
                                    "no column 'nope'"),
    "rows cut away at max_length": (
        [[chat(i, "long " * (60 if i % 3 else 1)) for i in range(30)]], {"max_length": 64}, "sft", TINY,
        "20 of 30 rows"),
    "every row cut away at max_length": ([[chat(i, "long " * 60) for i in range(30)]], {"max_length": 64}, "sft",
                                         TINY, "fills `data.max_length: 64`"),
    "a conversation the template refuses": (
        [[*CHAT_ROWS, {"messages": [{"role": "user", "content": "s"}, *CHAT_ROWS[0]["messages"]]}]], {}, "sft",
        {**TINY, "chat_template": str(ALTERNATE)}, "refuses this conversation (roles user, user, assistant)"),
    "an eval fraction and weights leave few rows": (
        [[chat(i) for i in range(12)], [chat(i) for i in range(5)]],
        {"eval": 0.25, "train": [{"weight": 0.5}, {"weight": 1.5}]}, "sft", TINY, "row(s), fewer than 16"),
    "conversations and prompt-completion pairs mixed": (
        [[{"instruction": "long " * (60 if i % 2 else 1), "output": "4", "system": "Be brief."} for i in range(10)],
         CHAT_ROWS], {"max_length": 64}, "sft", TINY, "5 of 10 rows"),
    "too few rows to hold out": ([[chat(0)]], {"eval": 0.1}, "sft", None, "there is only 1"),
    "sources of different kinds": ([CHAT_ROWS, [{"text": "plain"}]], {}, "sft", None, "cannot be mixed"),
}


@pytest.mark.parametrize("name", CASES)
def test_the_row_by_row_check_finds_what_the_run_finds(name, tmp_path):
    files, section, method, model, expected = CASES[name]
    section = dict(section)
    train = [{"path": str(write_jsonl(tmp_path / f"d{i}.jsonl", rows))} for i, rows in enumerate(files)]
    for spec, extra in zip(train, section.pop("train", [])):
        spec.update(extra)
    data = {"train": train, **section}
    assert scan.streamable(data, where)
    streamed, run = outcome(scan.check, data, method, model), outcome(whole, data, method, model)
    assert streamed == run
    assert expected in "\n".join(run[1] if run[0] is None else run[0])


def test_the_check_holds_no_rows(tmp_path):
    """Memory does not grow with the rows: the Python objects of 50,000 conversations would take tens of MB."""
    path = write_jsonl(tmp_path / "big.jsonl", (chat(i) for i in range(50_000)))
    data = {"train": [{"path": str(path)}]}
    tracemalloc.start()
    try:
        assert scan.check(data, method="sft", seed=0, locate=where) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 4, f"{peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.1f} MiB file"


def test_checking_rows_against_the_tokenizer_takes_the_same_memory_for_4x_the_rows(tmp_path, monkeypatch):
    """Rows go through the chat template and `data.max_length` a chunk at a time, then are let go."""
    monkeypatch.setattr(scan, "CHUNK", 100)
    monkeypatch.setattr(scan, "WORKERS", 1)  # all in this process, where tracemalloc sees it
    warm = {"train": [{"path": str(write_jsonl(tmp_path / "warm.jsonl", CHAT_ROWS))}], "max_length": 512}
    scan.check(warm, method="sft", seed=0, locate=where, model=TINY)  # imports what checking needs, once
    peaks = []
    for rows in (1_500, 6_000):
        path = write_jsonl(tmp_path / f"{rows}.jsonl", (chat(i, "long " * (i % 150)) for i in range(rows)))
        data = {"train": [{"path": str(path)}], "max_length": 512}
        tracemalloc.start()
        try:
            warnings = scan.check(data, method="sft", seed=0, locate=where, model=TINY)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        cut = sum(i % 150 >= 100 for i in range(rows))  # the template's tokens and 500+ of "long "
        assert f"{cut} of {rows} rows" in warnings[0] and f"{path}:101)" in warnings[0]
    assert peaks[1] < 1.3 * peaks[0], [f"{peak / 2**20:.1f} MiB" for peak in peaks]


def test_curated_data_and_hub_datasets_are_checked_whole(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS))
    assert not scan.streamable({"train": [{"path": path}], "curate": {"dedupe": "exact"}}, where)
    assert not scan.streamable({"train": [{"path": path}, {"path": "someone/dataset"}]}, where)
