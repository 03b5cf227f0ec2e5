"""Where Inferneo keeps things on this host, and the lock that lets processes share them.

One directory holds the runtime's verified S3 downloads, the packed ONNX copies, the checkpoints compiled
on demand and the builder's caches: $INFERNEO_CACHE_DIR, else `inferneo` under the user's cache directory.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock


def cache_root() -> Path:
    """$INFERNEO_CACHE_DIR, else inferneo under the user's cache dir; the builder's caches live here too."""
    base = os.environ.get("INFERNEO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inferneo")
    return Path(base)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its folder): a second process waits here until the first
    one has finished filling the cache entry the lock guards, then finds it done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield
