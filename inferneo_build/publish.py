"""Publish a finished staging directory at the output path atomically.

The old artifact stays in place until the new one is complete. On Linux the two directories are swapped
with renameat2(RENAME_EXCHANGE) in one step; elsewhere the old one is renamed aside first (and restored
if the second rename fails).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputNotReplaceable(Exception):
    """The output path holds something that is not an Inferneo artifact; a build would replace it."""

    exit_code = 2


def check_output(output: Path, force: bool = False) -> None:
    """Refuse (unless `force`) an output a build would destroy: `/`, the working directory or one of its
    ancestors, or an existing directory (or file) that holds no inferneo.json."""
    output = Path(os.path.abspath(output))
    blocker = next((p for p in output.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():  # even --force replaces the output only, never a parent
        raise OutputNotReplaceable(f"output {output}: {blocker} exists and is not a directory; choose another output")
    if force:
        return
    cwd = Path(os.path.abspath(os.getcwd()))
    if output == Path(output.anchor) or output == cwd or output in cwd.parents:
        what = "/" if output == Path(output.anchor) else "the working directory" if output == cwd else \
            "an ancestor of the working directory"
        raise OutputNotReplaceable(f"output {output} is {what}; a build replaces its output directory whole. Choose "
                                   f"a directory of its own (e.g. artifacts/<name>), or pass --force")
    if output.is_dir():
        if any(output.iterdir()) and not (output / "inferneo.json").is_file():
            raise OutputNotReplaceable(f"output {output} exists, is not empty and holds no inferneo.json (not an "
                                       f"Inferneo artifact); a build would replace what it holds. Choose another "
                                       f"output, or pass --force")
    elif output.exists() or output.is_symlink():
        raise OutputNotReplaceable(f"output {output} exists and is not a directory; choose another output, or pass "
                                   f"--force")


def staging_dir(output: Path) -> Path:
    """A fresh hidden directory beside `output` (same filesystem, so the final rename is atomic)."""
    from inferneo_runtime.stale import owned_name, remove_stale

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output.parent, f".{output.name}.staging-")  # left by builds that were killed
    path = output.parent / owned_name(f".{output.name}.staging-")
    path.mkdir()
    return path


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _remove(path: Path) -> None:
    """Remove what a publish replaced: the old artifact directory, or (with --force) a file or a symlink."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(staging: Path, output: Path) -> None:
    if not output.exists() and not output.is_symlink():
        os.rename(staging, output)
        return
    if _exchange(staging, output):  # staging now holds the old artifact
        _remove(staging)
        return
    aside = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except OSError:
        os.rename(aside, output)
        raise
    _remove(aside)


@contextmanager
def staged(output: Path, step: Optional[Callable[[str], ContextManager]] = None) -> Iterator[Path]:
    """A fresh staging directory beside `output` to write an artifact into; when the block ends it is published
    at `output` atomically (inside `step("publish <output>")` when given, e.g. `Progress.step`), and when the
    block or the publish raises it is removed and nothing reaches `output`."""
    staging = staging_dir(output)
    try:
        yield staging
        with step(f"publish {output}") if step is not None else nullcontext():
            publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
