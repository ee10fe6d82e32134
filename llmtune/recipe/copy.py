"""`llmtune recipes copy`: a shipped recipe plus the sample data it names, ready to edit."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import UserError
from ..paths import SHIPPED
from .loader import _read_yaml, shipped_recipe


def copy_recipe(name: str, dest: Path) -> list[Path]:
    """Copy to `dest` (a folder unless it names a .yaml file); sample data goes to `data/` beside it."""
    source = shipped_recipe(name)
    if source is None:
        raise UserError(f"no shipped recipe '{name}'; see `llmtune recipes list`")
    target = dest if dest.suffix in (".yaml", ".yml") else dest / source.name
    if target.exists():
        raise UserError(f"{target} already exists; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    text = source.read_text(encoding="utf-8")
    written = [target]
    # Data files travel with the recipe, so its relative paths keep working wherever it lands.
    problems: list = []
    data, _ = _read_yaml(source, problems)
    sections = (data or {}).get("data") or {}
    for split in ("train", "eval"):
        for item in sections.get(split) if isinstance(sections.get(split), list) else []:
            rel = item.get("path") if isinstance(item, dict) else None
            if not rel or Path(rel).is_absolute() or not (source.parent / rel).is_file():
                continue
            local = f"data/{Path(rel).name}"
            text = text.replace(f"path: {rel}", f"path: {local}")
            out = target.parent / local
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.parent / rel, out)
                written.append(out)
    # The header's commands name the copy, not the shipped file it came from.
    shipped = f"recipes/{source.relative_to(SHIPPED.resolve())}"
    lines = text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    text = "".join([line.replace(shipped, str(target)) for line in lines[:header]] + lines[header:])
    # The editor modeline points at the schema shipped with llmtune, not at a file that did not travel.
    schema = (SHIPPED / "recipe.schema.json").resolve()
    text = re.sub(r"(\$schema=)\S+", lambda m: m.group(1) + schema.as_uri(), text, count=1)
    target.write_text(text, encoding="utf-8")
    return written
