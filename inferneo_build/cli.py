"""Build-side commands, imported by `inferneo_runtime.cli` only when such a command runs."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from .build import Progress, build
from .recipe import load_recipe


def run_build(recipe_path: Path, output: Optional[Path], quiet: bool = False, force: bool = False,
              cache: Optional[str] = None, sign_key: Optional[Path] = None) -> dict:
    recipe = load_recipe(recipe_path)
    # transformers/torch chatter (deprecations, GGUF notices) is not the user's business during a build
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    progress = Progress(quiet=quiet)
    if cache and not force:  # no two CI jobs compile the same build key (fanout.build_lock)
        from .fanout import build_key_of, build_lock

        with build_lock(cache, build_key_of(recipe), progress.log):
            result = build(recipe, output, progress, force=force, cache=cache, sign_key=sign_key)
    else:
        result = build(recipe, output, progress, force=force, cache=cache, sign_key=sign_key)
    return {
        "ok": True,
        "output": str(result.output),
        "name": result.manifest.name,
        "seconds": round(result.seconds, 2),
        "cached": result.cached,
        "build_key": result.manifest.build_key,
        "targets": {name: {"status": t.status, "validation": t.validation.model_dump(mode="json")}
                    for name, t in result.manifest.targets.items()},
    }
