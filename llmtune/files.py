"""Run-directory file facts, Hub repository ids, and the write-then-rename helpers (a file, a folder).

Layout (DESIGN.md): the model or adapter and tokenizer, `recipe.yaml`, `manifest.json`,
`README.md`, `metrics.jsonl`, `loss.png`, `checkpoint-N/`, and `train.log`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

ARTIFACTS = ("adapter_config.json", "config.json")  # a final model: the run finished
RUN_LOCK = ".llmtune.lock"  # in a run directory while a run holds it (runner/lock.py)
BUILTIN_PREFIX = "builtin:"
# The Hub's own rule (huggingface_hub.utils.validate_repo_id), with the namespace required.
_REPO_ID = re.compile(r"\b[\w.-]+\b/\b[\w.-]{1,96}\b")


@contextmanager
def atomic_path(path: Path):
    """A temporary name beside `path` to write a file to, renamed onto `path` when the block succeeds (removed
    when it fails): a reader (another process, a later run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_folder(target: Path, replace: bool = True):
    """A new hidden folder beside `target` to write a whole folder into, renamed onto `target` when the block
    succeeds (removed when it fails): an interrupted write leaves nothing half-written. With `replace=False` a
    `target` that exists by then (another process wrote the same thing first) is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def someone_elses(path: Path, lock_counts: bool = True) -> str | None:
    """Why llmtune never writes into `path`, not even with --overwrite: a folder holding files it did not write (no
    llmtune manifest), which --overwrite would delete. None for a missing or empty folder, or a run directory: a
    run's lock counts (a run starting there writes its manifest after its first files) unless `lock_counts` is off."""
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if RUN_LOCK in entries and lock_counts:
        return None
    entries = [name for name in entries if name != RUN_LOCK]
    if not entries or read_manifest(path).get("llmtune"):
        return None
    listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return (f"'{path}' is not empty ({listed}) and is not an llmtune run directory (no manifest.json), so llmtune "
            "will not write into it, even with --overwrite; choose a new or empty folder")


def adapter_run(model: dict) -> dict | None:
    """The adapter config of a run directory named by `model.name` (e.g. an SFT LoRA run), else None."""
    path = Path(model["name"]).expanduser() / "adapter_config.json"
    if model["name"].startswith(BUILTIN_PREFIX) or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def is_repo_id(name: str, folder: Path | None = None) -> bool:
    """`owner/name` as the Hub spells ids; given the `folder` a relative path in `name` would be relative to, also
    only when nothing there claims it: no folder `folder/owner/name`, nor `folder/owner` (`runs/x` once `runs/`
    exists is a path, a missing one included)."""
    if not (_REPO_ID.fullmatch(name) and "--" not in name and ".." not in name and not name.endswith(".git")):
        return False
    return folder is None or not (name.startswith(("./", "../", "/", "~")) or (folder / name).exists()
                                  or (folder / name.split("/")[0]).is_dir())


def not_on_hub(error: Exception) -> bool:
    """Whether a Hub request failed because the repository does not exist (404, or the 401 the Hub answers to
    an unknown id without a token), rather than for want of access or of a network."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    return (isinstance(error, RepositoryNotFoundError) and not isinstance(error, GatedRepoError)) or status == 404
