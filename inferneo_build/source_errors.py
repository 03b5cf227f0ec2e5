"""`SourceError`, in a module of its own that imports nothing from inferneo_build, so that every module resolving
or fixing a checkpoint (and the bench's peers) can raise it without importing the others."""
from __future__ import annotations


class SourceError(ValueError):
    """The checkpoint cannot be found or read."""

    exit_code = 2
