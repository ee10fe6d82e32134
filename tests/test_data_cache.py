"""The prepared-data cache: a second run skips reading; any change of file or setting misses."""

import pytest

import llmtune.data.prepare as data_module
from llmtune.data import load_data

from .conftest import write_jsonl

ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def section(path, **extra):
    return {"train": [{"path": str(path), "format": "auto", "columns": {}, "weight": 1.0, **extra}], "eval": 0.1}


def test_second_load_is_a_hit_and_changes_miss(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", [ROW] * 30)
    first = load_data(section(path), method="sft", seed=3)

    calls = []
    real = data_module.read_source
    monkeypatch.setattr(data_module, "read_source", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = load_data(section(path), method="sft", seed=3)
    assert calls == []  # nothing was read or converted again
    assert second.train.to_list() == first.train.to_list() and second.eval.to_list() == first.eval.to_list()
    assert [vars(s) for s in second.sources] == [vars(s) for s in first.sources]

    load_data(section(path), method="sft", seed=4)  # another seed: another split
    load_data(section(path, weight=2.0), method="sft", seed=3)  # another setting
    write_jsonl(path, [ROW] * 31)  # another file content
    changed = load_data(section(path), method="sft", seed=3)
    assert len(calls) == 3 and changed.sources[0].rows == 31


def test_bad_data_is_never_cached(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    for _ in range(2):
        with pytest.raises(data_module.UserError, match="no assistant turn"):
            load_data(section(path), method="sft", seed=0)


def test_check_data_trusts_a_cache_hit_without_importing_datasets(tmp_path):
    import json
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "chat.jsonl", [ROW] * 30)
    load_data(section(path), method="sft", seed=3)
    code = ("import sys, json; from llmtune.data import check_data; "
            f"check_data(json.loads({json.dumps(json.dumps(section(path)))}), method='sft', seed=3); "
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
