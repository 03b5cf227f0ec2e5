"""What every kind of model source shares: the error, the options that apply to all models, and `Resolved`,
the base class each kind of source subclasses."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from ..errors import InferneoError
from ..manifest import Manifest

# manifest dtype (the weights') -> precision, for targets written before `precision` was recorded
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype's precision -> words
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_SEQUENCE = 2048


class ModelSourceError(InferneoError):
    """A --model value cannot be served as given (wrong kind of path, no matching target, bad file)."""

    exit_code = 2
    code = "invalid_format"


@dataclass(frozen=True)
class ServeOptions:
    """What applies to every model served: --max-model-len, --max-batch-size and the trusted signing keys."""

    max_model_len: Optional[int] = None
    max_batch_size: Optional[int] = None
    trusted_keys: Optional[list[str]] = None


@dataclass
class Resolved:
    """A model ready to be registered: where it is, what it is, and how to load it.

    Each kind of source subclasses it: `matches(spec)` says whether a --model value (a ModelConfig) is of that
    kind, `resolve(spec, options)` does the cheap part (read a manifest, pick a target, compile a checkpoint) and
    `load(device, threads)` loads the model."""

    kind: ClassVar[str]  # what the model info reports: artifact | checkpoint | file | custom

    name: str
    source: str  # what was asked for
    root: Optional[Path] = None
    manifest: Optional[Manifest] = None
    target: Optional[str] = None
    weight_bytes: int = 0
    validated: bool = True
    notes: list[str] = field(default_factory=list)
    max_batch: Optional[int] = None  # caps on the engine (the artifact's bounds are the ceiling)
    max_sequence: Optional[int] = None

    @classmethod
    def matches(cls, spec) -> bool:
        raise NotImplementedError

    @classmethod
    def resolve(cls, spec, options: ServeOptions) -> "Resolved":
        raise NotImplementedError

    def load(self, device: str = "cpu", threads: Optional[int] = None):
        raise NotImplementedError


def local_path(spec) -> Path:
    return Path(str(spec.path)).expanduser()


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def served_name(text: str) -> str:
    """A recipe/directory-safe name for a served model."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:128]
    return name or "model"
