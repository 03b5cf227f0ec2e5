"""What `--model` (or `ModelManager.register`) accepts, resolved into something the registry can serve.

    artifact directory or s3:// URI   the normal path: manifest verified, a target chosen        (artifact.py)
    HF checkpoint directory, hub id    compiled on demand by inferneo_build, output under
                                       $INFERNEO_CACHE_DIR/served/<name>; the build cache makes a
                                       restart free                                                (checkpoint.py)
    model.onnx / model.pt / model.plan a bare exported file, its manifest synthesized from the
                                       graph and config.json; served unvalidated, and said so      (bare_file.py)
    --model-class module:Class         a CustomModel subclass (inferneo_runtime.models)            (custom_class.py)

`resolve(spec, ...)` asks each kind of source, in order, whether the spec is its kind; the first that matches
does the cheap part (read manifests, pick a target, compile a checkpoint) and returns a `Resolved`.
`Resolved.load(device, threads)` loads it.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .artifact import Artifact, adapter_sha256, check_adapters, precision_of, select_target
from .bare_file import BareFile
from .checkpoint import Checkpoint
from .common import ModelSourceError, Resolved, ServeOptions, local_path, served_name
from .custom_class import CustomClass, import_class, load_custom

__all__ = ["SOURCES", "Artifact", "BareFile", "Checkpoint", "CustomClass", "ModelSourceError", "Resolved",
           "ServeOptions", "adapter_sha256", "check_adapters", "import_class", "load_custom", "precision_of",
           "resolve", "select_target", "served_name"]

# First match wins: --model-class whatever the path; a directory with both inferneo.json and config.json is
# the artifact, not the checkpoint it was built from.
SOURCES: tuple[type[Resolved], ...] = (CustomClass, Artifact, BareFile, Checkpoint)


def resolve(spec, *, max_model_len: Optional[int] = None, max_batch_size: Optional[int] = None,
            trusted_keys: Optional[Sequence[str]] = None, device: str = "cpu") -> Resolved:
    """Resolve one ModelConfig (server/config.py) into a Resolved model."""
    from ..signing import resolve_trusted_keys

    keys = [str(k) for k in resolve_trusted_keys(list(trusted_keys) if trusted_keys else None)] or None
    options = ServeOptions(max_model_len=max_model_len, max_batch_size=max_batch_size, trusted_keys=keys)
    for source in SOURCES:
        if source.matches(spec):
            return source.resolve(spec, options)
    raise _no_source(spec)


def _no_source(spec) -> ModelSourceError:
    path = str(spec.path)
    if local_path(spec).is_dir():
        # (what the directory holds is not listed: over the API that would let a caller read directories)
        return ModelSourceError(f"{path}: not an Inferneo artifact (no inferneo.json) nor a Hugging Face checkpoint "
                                f"(no config.json). --model takes an "
                                f"artifact directory, an s3:// URI, a checkpoint directory, a hub id, or a "
                                f"model.onnx / model.pt / model.plan file with --model-type")
    return ModelSourceError(f"{path}: no such file or directory (nor a hub id like org/name)")
