"""When Inferneo draws progress on stderr.

`INFERNEO_PROGRESS=0` (or false/no/off) turns every progress display off: the build's step lines and spinners,
and the S3 transfer bars. Bars and spinners are drawn only on a terminal (a log file gets no redraw noise);
`INFERNEO_PROGRESS=1` draws the bars anyway. `--json` and `--quiet` turn progress off on their own.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

ENV = "INFERNEO_PROGRESS"


def env_setting() -> Optional[bool]:
    """INFERNEO_PROGRESS as a bool: False for 0/false/no/off, True for 1/true/yes/on, None when unset/other."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def progress_off() -> bool:
    """True when INFERNEO_PROGRESS turns all progress output off."""
    return env_setting() is False


def bars_enabled(stream: Optional[TextIO] = None) -> bool:
    """Whether live bars may be drawn on `stream` (default stderr): INFERNEO_PROGRESS decides when set, else
    only on a terminal."""
    setting = env_setting()
    if setting is not None:
        return setting
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
