"""Shared fixtures: an isolated llmtune cache (the builtin tiny model is built there once), the recipe builder
`make_recipe`, and the tiers: `pytest -m "not slow"` leaves out real training (`slow`) and multi-process
launches (`distributed`, counted as slow too)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Two cores, and tests (and the processes they start) run side by side: one thread each avoids
# OpenMP oversubscription, which slows tiny-model training by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CHAT = RECIPES / "data" / "chat.jsonl"


def pytest_collection_modifyitems(items):
    # A multi-process launch is slow too: `-m "not slow"` is the one fast-tier selection.
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def llmtune_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("llmtune-cache")
    os.environ["LLMTUNE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental Hub access fails fast instead of hanging
    return cache


def cli(*args, cwd=None, env=None):
    """Run `python -m llmtune ...` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "llmtune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# Sections in the order recipes are usually written (any other section goes between `model` and `data`).
_ORDER = {"method": 0, "model": 1, "data": 3, "train": 4, "early_stopping": 5, "hub": 5}


def _merged(base, override):
    """`override` on `base`: mappings merge key by key, None removes a key, anything else replaces."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def built_trainer(tmp_path, method, rows, model, data=None, **sections):
    """The TRL trainer `llmtune METHOD` builds for `rows` on `model` (its train_dataset is tokenized); `data` and
    `sections` are merged into the recipe (make_recipe)."""
    from importlib import import_module

    from llmtune.data import load_data
    from llmtune.model import load_model
    from llmtune.recipe.check import resolve
    from llmtune.runner.trainer_args import training_args
    from llmtune.tokenizer import load_tokenizer

    data = {"train": [{"path": write_jsonl(tmp_path / "rows.jsonl", rows)}], **(data or {})}
    resolved = resolve(make_recipe(tmp_path, method, data=data, model={"name": str(model)}, **sections))
    data = load_data(resolved.config["data"], method=method, seed=0, locate=resolved.locate,
                     model=resolved.config["model"])
    runner = import_module(resolved.method.runner)
    args = training_args(resolved, tmp_path / "scratch", runner.defaults(resolved.config, data))
    return runner.build_trainer(args=args, model=load_model(resolved.config),
                                tokenizer=load_tokenizer(resolved.config["model"]), data=data, peft_config=None,
                                callbacks=[])


def make_recipe(folder: Path, method: str = "sft", data=CHAT, *, name: str = "r", text: str = "",
                **sections) -> Path:
    """Write `folder/NAME.yaml` and return its path: `method` on builtin:tiny in float32, trained on `data`.

    `data` is a file (or a list of files) to train on, or a mapping merged into the `data:` section
    (`{"max_length": 64}` keeps the default file). Each of `sections` is merged into its section the same
    way: mappings key by key, None removes a key (`model={"dtype": None}`), anything else replaces.
    `text` is raw YAML appended as written, for what a mapping cannot say (`${...}`, layout, bad syntax).
    """
    sources = [data] if isinstance(data, (str, Path)) else data
    if isinstance(sources, list):
        data = {"train": [{"path": path} for path in sources]}
    recipe = _merged({"method": method, "model": {"name": "builtin:tiny", "dtype": "float32"},
                      "data": {"train": [{"path": CHAT}]}}, {"data": data, **sections})
    recipe = dict(sorted(recipe.items(), key=lambda item: _ORDER.get(item[0], 2)))
    body = yaml.safe_dump(_plain(recipe), sort_keys=False, default_flow_style=None, width=1000)
    return write_recipe(folder / f"{name}.yaml", body + text)


# A successful run's terminal (test_quiet.py, test_launch.py).
BAR = re.compile(r"^\s*\d+%\|")  # one redraw of the progress bar: "  33%|███▎      | 1/3 [...]"
CHATTER = ("Setting accelerator to CPU", "Skipping publisher trust check", "trust_remote_code", "find_unused_parameters",
           "Retrying in")


def terminal_lines(result) -> list[str]:
    """What the run printed on stdout and stderr, line by line, without the bar's redraws (joined by \\r)."""
    lines = []
    for line in (result.stdout + result.stderr).split("\n"):
        kept = [part for part in line.split("\r") if part.strip() and not BAR.match(part)]
        lines.extend(kept)
    return lines


def assert_quiet(result, out, processes):
    assert result.returncode == 0, result.stderr[-3000:]
    lines = terminal_lines(result)
    assert len(lines) <= 8, lines
    assert f"effective batch: 4 per device x 1 accumulation x {processes} process(es) = {4 * processes} " \
           "per optimizer step" in lines
    assert f"run directory: {out}" in lines
    assert any(line.startswith("train_loss ") for line in lines), lines
    assert not [line for line in lines if any(chatter in line for chatter in CHATTER)], lines
    assert "100%|" in result.stderr  # the bar was there, and ran to the end
