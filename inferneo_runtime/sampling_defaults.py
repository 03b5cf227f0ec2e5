"""The sampling defaults a model's authors ship in its generation_config.json (Qwen3: temperature 0.6, top_p 0.95,
top_k 20), read as the server's defaults for requests that leave those fields unset, as vLLM does by default.

Only the fields vLLM takes are read; `do_sample` is ignored as vLLM ignores it (an OpenAI request samples at its
temperature). A value outside what a request may ask is left out with a warning naming the file and field, so
a checkpoint's odd config never refuses the model or breaks requests."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("inferneo")

# generation_config.json field -> the request field it is the default of, and the values a request may give it
_FIELDS = {
    "temperature": ("temperature", lambda v: v >= 0),
    "top_p": ("top_p", lambda v: 0 < v <= 1),
    "top_k": ("top_k", lambda v: v == int(v) and v >= -1),
    "min_p": ("min_p", lambda v: 0 <= v <= 1),
    "repetition_penalty": ("repetition_penalty", lambda v: v > 0),
    "max_new_tokens": ("max_tokens", lambda v: v == int(v) and v >= 1),
}


def read_sampling_defaults(root: Path) -> dict:
    """The request defaults in `root`/generation_config.json ({} when it has none or the file is absent)."""
    path = Path(root) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s); no sampling defaults taken from it", path, e)
        return {}
    if not isinstance(config, dict):
        return {}
    defaults = {}
    for field, (name, allowed) in _FIELDS.items():
        value = config.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not allowed(value):
            logger.warning("%s: %s=%r is not a value a request may give %s; left out of the sampling defaults",
                           path, field, value, name)
            continue
        defaults[name] = int(value) if name in ("top_k", "max_tokens") else float(value)
    return defaults
