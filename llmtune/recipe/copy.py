"""`llmtune recipes copy`: a shipped recipe plus the sample data it names, ready to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError
from .loader import _read_yaml, shipped_recipe


def copy_recipe(name: str, dest: Path) -> list[Path]:
    source = shipped_recipe(name)
    if source is None:
        raise UserError(f"no shipped recipe '{name}'; see `llmtune recipes list`")
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise UserError(f"{target} already exists; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    written = [target]
    # Relative data paths keep working when the files they name travel with the recipe.
    problems: list = []
    data, _ = _read_yaml(source, problems)
    sections = (data or {}).get("data") or {}
    for split in ("train", "eval"):
        for item in sections.get(split) or [] if isinstance(sections.get(split), list) else []:
            rel = item.get("path") if isinstance(item, dict) else None
            if not rel or Path(rel).is_absolute() or not (source.parent / rel).is_file():
                continue
            out = target.parent / rel
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.parent / rel, out)
                written.append(out)
    return written


