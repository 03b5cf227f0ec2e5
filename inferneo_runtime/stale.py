"""Temporary directories that carry their owner's process id, so that the ones a killed process left behind are
found and removed by the next build or pull beside them (a killed build can leave gigabytes of staging)."""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

_HOST = socket.gethostname().replace(".", "_")


def owned_name(prefix: str) -> str:
    """`<prefix><host>.<pid>.<random>`: a fresh name that records which process on which host owns it."""
    return f"{prefix}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(directory: Path, prefix: str) -> list[Path]:
    """Remove `directory/<prefix>*` entries made by owned_name() on this host whose process is gone."""
    removed = []
    for path in directory.glob(f"{prefix}*"):
        parts = path.name[len(prefix):].split(".")
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue  # another host's (a shared filesystem) or not ours: leave it
        if int(parts[1]) != os.getpid() and not _alive(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
