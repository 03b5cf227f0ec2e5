"""A Hugging Face checkpoint (a directory with config.json, or a hub id in the local HF cache), compiled on
demand by the builder (inferneo_build.on_demand) into $INFERNEO_CACHE_DIR/served/<name>; the build cache makes a
restart free. The compiled artifact is then served like any other."""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InferneoError, MissingExtraError
from ..model_config import DTYPES
from .artifact import Artifact
from .common import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQUENCE, ModelSourceError, ServeOptions, local_path, served_name

logger = logging.getLogger("inferneo.server")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint(Artifact):
    kind = "checkpoint"

    @classmethod
    def matches(cls, spec) -> bool:
        path, p = str(spec.path), local_path(spec)
        if p.is_dir():
            return (p / "config.json").is_file()
        return not p.is_file() and bool(HUB_ID.match(path)) and not path.startswith((".", "/"))

    @classmethod
    def resolve(cls, spec, options: ServeOptions) -> "Checkpoint":
        p = local_path(spec)
        directory, hub_id = (p, None) if p.is_dir() else (None, str(spec.path))
        what = str(directory) if directory is not None else f"hub id {hub_id}"
        try:  # the runtime's one use of the builder
            from inferneo_build.on_demand import OnDemandRecipeError, compile_checkpoint
        except ImportError as e:
            raise MissingExtraError(f"{what} is a Hugging Face checkpoint, not an Inferneo artifact; compiling it on "
                                    f"demand", "build", getattr(e, "name", None) or "inferneo_build") from None
        if options.trusted_keys:
            raise ModelSourceError(f"{what}: a checkpoint compiled on demand is not signed, and trusted keys are "
                                   f"configured; build and sign it first (inferneo build RECIPE --sign KEY) and serve "
                                   f"the artifact")
        from ..local_cache import cache_root, file_lock

        name = spec.name or (hub_id if hub_id else directory.resolve().name)
        recipe_name = served_name(name)
        notes: list[str] = []
        fmt = spec.format or "onnx"
        precision = _build_precision(fmt, spec.dtype, spec.quantization, notes)
        config = _checkpoint_config(directory, hub_id)
        max_positions = int(config.get("max_position_embeddings") or config.get("n_positions") or 0) or None
        max_sequence = options.max_model_len or min(DEFAULT_MAX_SEQUENCE, max_positions or DEFAULT_MAX_SEQUENCE)
        if max_positions and max_sequence > max_positions:
            notes.append(f"--max-model-len {max_sequence} exceeds {name}'s max_position_embeddings {max_positions}; "
                         f"compiled for {max_positions}")
            max_sequence = max_positions
        max_batch = options.max_batch_size or DEFAULT_MAX_BATCH
        output = cache_root() / "served" / recipe_name
        t0 = time.perf_counter()
        logger.info("model %s: compiling %s (%s %s, max_sequence %d, max_batch %d) into %s", name, what, fmt,
                    precision, max_sequence, max_batch, output)
        try:
            with file_lock(output.parent / f".{recipe_name}.lock"):  # two servers compiling one checkpoint: one builds
                result = compile_checkpoint(output, name=recipe_name, checkpoint_dir=directory, hub_id=hub_id,
                                            adapters=spec.adapters or (), format=fmt, precision=precision,
                                            max_sequence=max_sequence, max_batch=max_batch)
        except OnDemandRecipeError as e:
            raise ModelSourceError(f"{what}: cannot make a build recipe from the flags: {e}") from None
        except InferneoError:
            raise
        except Exception as e:  # noqa: BLE001 - the builder's errors (source, validation), said as this model's
            lead = f"{hub_id}: no such directory, and as a hub id" if hub_id else f"compiling {what}"
            error = ModelSourceError(f"{lead}: {e}")
            error.exit_code = getattr(e, "exit_code", 2)
            raise error from None
        if result.cached:
            logger.info("model %s: compiled artifact %s is up to date (build cache); nothing rebuilt", name, output)
        else:
            logger.info("model %s: compiled in %.1fs into %s", name, time.perf_counter() - t0, output)
        # served as the artifact it became: every flag was spent on the build
        compiled = cls.read(spec.model_copy(update={"name": name, "target": None, "format": fmt, "dtype": None,
                                                     "quantization": None, "adapters": None}), output, None)
        compiled.source, compiled.notes = str(spec.path), notes + compiled.notes
        return compiled


def _checkpoint_config(directory: Optional[Path], hub_id: Optional[str]) -> dict:
    try:
        if directory is None:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(hub_id, local_files_only=True))
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - the build reports a missing or bad checkpoint with its own words
        return {}


def _build_precision(fmt: str, dtype: Optional[str], quantization: Optional[str], notes: list[str]) -> str:
    want = DTYPES.get(dtype or "auto")
    if quantization:
        if fmt != "onnx":
            raise ModelSourceError(f"--quantization {quantization} builds onnx targets; --model-type {fmt} cannot "
                                   f"be quantized (use --model-type onnx)")
        if want and want != "fp32":
            notes.append(f"--dtype {dtype}: the {quantization} ONNX target stores its MatMul weights in "
                         f"{quantization} and computes the rest in float32; --dtype does not change that")
        return quantization
    if fmt == "tensorrt":
        return want or "fp16"
    if want == "bf16" and fmt == "onnx":
        raise ModelSourceError("--dtype bfloat16 is built for torchscript and tensorrt targets; ONNX targets are "
                               "float32, float16, int8 or int4 (pass --model-type torchscript)")
    return want or "fp32"
