"""One run per directory: a lock file naming the process and host that hold it.

The lock is created whole (written under a temporary name, then hard-linked into place,
which fails if it exists), so a reader never sees half of one. A lock whose process is gone
(same host, pid no longer running) is stale and cleared; one from another host cannot be
checked, so the message says how to clear it by hand.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
from pathlib import Path

from ..errors import UserError
from ..files import RUN_LOCK

NAME = RUN_LOCK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def holder(folder: Path) -> dict | None:
    """Who holds `folder`'s lock, or None; a stale lock is removed on the way."""
    path = Path(folder) / NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable: not one of ours, written whole; treat as stale
        info = {}
    if info and info.get("host") != socket.gethostname():
        return info  # cannot look at another host's processes: assume it is alive
    pid = info.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
        return info
    with contextlib.suppress(OSError):  # a read-only disk keeps it; stale all the same
        path.unlink(missing_ok=True)
    return None


def describe(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def refuse_if_held(folder: Path) -> None:
    info = holder(folder)
    if info:
        hint = "" if info.get("host") == socket.gethostname() else (
            f"; if no run is alive on {info.get('host')}, delete {Path(folder) / NAME}")
        raise UserError(f"{folder}: another run is writing into this directory ({describe(info)}); wait for it "
                        f"to finish or pass --output-dir DIR{hint}")


def acquire(folder: Path) -> Path:
    """Take `folder`'s lock for this process; refused while a live run holds it."""
    path = Path(folder) / NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_name(f"{NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                refuse_if_held(folder)  # a live holder is refused; a stale lock is gone now: try again
        raise UserError(f"{folder}: cannot take the lock {path}; another run keeps taking it")
    finally:
        tmp.unlink(missing_ok=True)


def release(path: Path | None) -> None:
    """Drop the lock if this process still holds it."""
    if path is None:
        return
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
