"""Where llmtune keeps things: its cache, the shipped recipes and launch configs, chat template files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UserError

SHIPPED = Path(__file__).resolve().parent / "recipes"  # the repository's recipes/, shipped inside the package
LAUNCH_CONFIGS = SHIPPED / "launch"


def cache_dir() -> Path:
    root = os.environ.get("LLMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmtune")
    return Path(root)


def _trl_templates_dir() -> Path:
    spec = importlib.util.find_spec("trl")
    return Path(spec.submodule_search_locations[0]) / "chat_templates"


def named_chat_templates() -> list[str]:
    return sorted(p.stem for p in _trl_templates_dir().glob("*.jinja") if not p.stem.endswith("_training"))


def read_chat_template(value: str) -> str:
    """A `.jinja` file, or the name of a template TRL ships (llama3, qwen2_5, ...)."""
    if value.endswith((".jinja", ".j2")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"model.chat_template: file '{value}' not found")
        return path.read_text(encoding="utf-8")
    path = _trl_templates_dir() / f"{value}.jinja"
    if not path.is_file():
        raise UserError(f"model.chat_template: unknown template '{value}'; give a .jinja file or one of: "
                        + ", ".join(named_chat_templates()))
    return path.read_text(encoding="utf-8")
