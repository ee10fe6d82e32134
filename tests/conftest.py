"""Shared fixtures: an isolated llmtune cache (the builtin tiny model is built there once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two cores, and tests (and the processes they start) run side by side: one thread each avoids
# OpenMP oversubscription, which slows tiny-model training by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


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
