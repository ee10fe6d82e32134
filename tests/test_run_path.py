"""The one run path (runner/session.py): the data is checked and prepared once per process, `validate`
writes nothing, and the CLI maps the outcome to an exit code."""

import hashlib
import json
import shutil
from collections import Counter

from typer.testing import CliRunner

import llmtune.data.sources as sources
from llmtune.cli import app

from .conftest import RECIPES, write_recipe

RECIPE = """\
method: sft
model: {{name: "builtin:tiny", dtype: float32}}
data:
  train: [{{path: {data}}}]
  eval: 0.1
  max_length: 64
train: {{max_steps: 1, per_device_train_batch_size: 2, save_strategy: "no", logging_steps: 1}}
output_dir: {out}
"""


def _count_hashes(monkeypatch) -> Counter:
    """Data files hashed (each call reads every file it is given), counted per file list."""
    counted = Counter()
    real = sources._hash_files
    monkeypatch.setattr(sources, "_hash_files", lambda paths: counted.update([tuple(paths)]) or real(paths))
    return counted


def _new_process(monkeypatch):
    monkeypatch.setattr(sources, "_DIGESTS", {})  # what a process remembers of the files it hashed


def test_each_data_file_is_hashed_once_per_process_cold_and_warm(tmp_path, monkeypatch):
    data = tmp_path / "chat.jsonl"
    shutil.copy(RECIPES / "data" / "chat.jsonl", data)
    with data.open("a", encoding="utf-8") as f:  # content no other test has cached: the first run is cold
        f.write(json.dumps({"messages": [{"role": "user", "content": str(tmp_path)},
                                         {"role": "assistant", "content": "ok"}]}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(data=data, out=tmp_path / "run"))
    counted = _count_hashes(monkeypatch)
    runner = CliRunner()
    for run in ("cold", "warm"):
        _new_process(monkeypatch)
        result = runner.invoke(app, ["sft", str(recipe), "--output-dir", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
        assert counted == Counter({(str(data),): 1}), run
        counted.clear()
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["status"] == "completed"
        assert manifest["data"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_validate_writes_nothing_into_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMTUNE_CACHE", str(cache))
    data = shutil.copy(RECIPES / "data" / "chat.jsonl", tmp_path / "chat.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(data=data, out=tmp_path / "run"))
    counted = _count_hashes(monkeypatch)
    _new_process(monkeypatch)
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    assert counted == Counter({(str(data),): 1})


def test_the_model_config_is_read_once_per_process(monkeypatch):
    import transformers
    from transformers import utils

    from llmtune import defaults
    from llmtune.builtin import builtin_path

    builtin_path("tiny")  # built: its config is read from its folder (an unbuilt one is made in memory)
    defaults._read_config.cache_clear()
    reads = []
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
    monkeypatch.setattr(defaults, "_gpu", lambda: (8, 0))  # a GPU machine with flash-attn and Liger: both read it
    monkeypatch.setattr(utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(utils, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(utils, "is_liger_kernel_available", lambda: True)
    monkeypatch.setattr(defaults, "_liger_model_types", lambda: {"llama"})
    model = {"name": "builtin:tiny", "dtype": "bfloat16", "trust_remote_code": False, "attn_implementation": None}
    config = {"model": model, "train": {}}
    picks = [defaults.attention(model), defaults.liger(config, "sft"), defaults.attention(model)]
    assert [p.value for p in picks] == ["flash_attention_2", True, "flash_attention_2"]
    assert len(reads) == 1
    defaults.auto_config(model).model_type = "changed"  # a caller's change stays its own
    assert defaults.auto_config(model).model_type == "llama"
