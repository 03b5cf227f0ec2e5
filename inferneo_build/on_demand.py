"""Compile a Hugging Face checkpoint on demand: what `inferneo serve --model CHECKPOINT` runs.

The caller says what it wants in typed arguments; the recipe (source, target, shapes, validation) is made here,
so the runtime never assembles one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .build import build
from .pipeline import BuildResult, Progress
from .recipe import Recipe, RecipeError

VALIDATION_PROMPTS = ["Hello", "The quick brown fox"]
VALIDATION_MAX_NEW_TOKENS = 16


class OnDemandRecipeError(RecipeError):
    """The arguments make no valid recipe; the message is the recipe's validation error."""


def compile_checkpoint(output: Path, *, name: str, checkpoint_dir: Optional[Path] = None,
                       hub_id: Optional[str] = None, adapters: Sequence[str] = (), format: str = "onnx",
                       precision: str = "fp32", max_sequence: int, max_batch: int,
                       progress: Optional[Progress] = None) -> BuildResult:
    """Build the checkpoint in `checkpoint_dir` (or the hub's `hub_id`), with `adapters` merged in, into one
    `format` target at `precision`, for `max_batch` sequences of up to `max_sequence` tokens, at `output`
    (the build cache makes a second call with the same arguments free). Quiet unless given a Progress."""
    if (checkpoint_dir is None) == (hub_id is None):
        raise ValueError("compile_checkpoint: give exactly one of checkpoint_dir and hub_id")
    target = {"format": format}
    if format != "tensorrt" or precision != "fp16":  # fp16 is TensorRT's default precision: left unsaid
        target["precision"] = precision
    source = {"hf": hub_id} if hub_id else {"path": str(Path(checkpoint_dir).resolve())}
    if adapters:
        source["adapters"] = [str(Path(a).resolve()) for a in adapters]
    try:
        recipe = Recipe.model_validate({
            "name": name, "source": source, "targets": [target],
            "shapes": {"max_batch": max_batch, "max_sequence": max_sequence},
            "validation": {"prompts": VALIDATION_PROMPTS, "max_new_tokens": VALIDATION_MAX_NEW_TOKENS},
            "output": str(output)})
    except Exception as e:  # noqa: BLE001 - pydantic's error (or a validator's), kept as its own words
        raise OnDemandRecipeError(str(e)) from None
    return build(recipe, Path(output), progress=progress or Progress(quiet=True))
