"""A built artifact (a directory with inferneo.json, or an s3:// URI): the normal path. The manifest is verified
and a target chosen by --model-type, --quantization and --dtype: the first filters by format, the second by
weight precision, the third (without --quantization) by precision too; an artifact without a matching target is
an error that lists what it has."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from ..manifest import Manifest, TargetEntry, read_manifest, sha256_file
from ..model_config import DTYPES
from .common import DTYPE_PRECISION, ModelSourceError, Resolved, ServeOptions, is_s3, local_path

TARGET_PREFERENCE = ("onnx", "torchscript", "pt2", "tensorrt")


@dataclass
class Artifact(Resolved):
    kind = "artifact"

    trusted_keys: Optional[list[str]] = None  # checked again when the artifact is loaded

    @classmethod
    def matches(cls, spec) -> bool:
        if is_s3(str(spec.path)):
            return True
        p = local_path(spec)
        return p.is_dir() and (p / "inferneo.json").is_file()

    @classmethod
    def resolve(cls, spec, options: ServeOptions) -> "Artifact":
        path = str(spec.path)
        root = _fetch_s3(path) if is_s3(path) else local_path(spec)
        artifact = cls.read(spec, root, options.trusted_keys)
        # (checkpoints are compiled, and bare files bounded, for these values; a built artifact is capped here)
        artifact.apply_caps(options.max_model_len, options.max_batch_size)
        return artifact

    @classmethod
    def read(cls, spec, root: Path, keys: Optional[list[str]]) -> "Artifact":
        """The artifact at `root`: signature checked, manifest read, the target chosen by `spec`'s flags."""
        from ..artifact import check_signature
        from ..preflight import weights_bytes

        check_signature(root, keys)  # before anything else of the artifact is read
        manifest = read_manifest(root)
        notes: list[str] = []
        target = select_target(manifest, spec.target, spec.format, spec.dtype, spec.quantization, notes)
        check_adapters(manifest, spec.adapters or [], str(spec.path))
        return cls(name=spec.name or manifest.name, source=str(spec.path), root=root, manifest=manifest,
                   target=target, weight_bytes=weights_bytes(manifest.targets[target]), notes=notes,
                   trusted_keys=keys)

    def load(self, device: str = "cpu", threads: Optional[int] = None):
        from ..artifact import load

        return load(self.root, target=self.target, device=device, threads=threads, trusted_keys=self.trusted_keys)

    def apply_caps(self, max_model_len: Optional[int], max_batch_size: Optional[int]) -> None:
        """--max-model-len / --max-batch-size: caps within the artifact's bounds; above them, the bound (said)."""
        shapes = self.manifest.targets[self.target].shapes
        bound_seq = shapes.max_sequence if shapes else self.manifest.model.max_positions
        bound_batch = shapes.max_batch if shapes else 1
        if max_model_len is not None:
            self.max_sequence = min(max_model_len, bound_seq)
            if max_model_len > bound_seq:
                self.notes.append(f"--max-model-len {max_model_len} exceeds the {bound_seq} tokens {self.name!r} was "
                                  f"built for; serving {bound_seq} (rebuild with shapes.max_sequence: {max_model_len})")
        if max_batch_size is not None:
            self.max_batch = min(max_batch_size, bound_batch)
            if max_batch_size > bound_batch:
                self.notes.append(f"--max-batch-size {max_batch_size} exceeds the batch of {bound_batch} {self.name!r} "
                                  f"was built for; running {bound_batch} sequences per step, the rest wait their turn "
                                  f"(rebuild with shapes.max_batch: {max_batch_size})")


def _fetch_s3(uri: str) -> Path:
    from .. import s3

    return Path(s3.fetch(uri))


def precision_of(entry: TargetEntry) -> str:
    return getattr(entry, "precision", None) or DTYPE_PRECISION.get(entry.dtype, entry.dtype)


def _describe_targets(manifest: Manifest) -> str:
    return ", ".join(f"{n} ({t.format} {precision_of(t)}{'' if t.status == 'valid' else ', ' + t.status})"
                     for n, t in manifest.targets.items()) or "none"


def select_target(manifest: Manifest, target: Optional[str], fmt: Optional[str], dtype: Optional[str],
                  quantization: Optional[str], notes: Optional[list] = None) -> str:
    """The target to serve: named, or the preferred valid one matching format, quantization and dtype."""
    from ..artifact import choose_target
    notes = notes if notes is not None else []
    want = DTYPES.get(dtype or "auto")
    if target is not None:
        name = choose_target(manifest, target)
        entry = manifest.targets[name]
        if fmt and entry.format != fmt:
            raise ModelSourceError(f"target {name!r} of {manifest.name!r} is {entry.format}, not --model-type {fmt}")
        candidates = [name]
    else:
        candidates = manifest.valid_targets()
        if fmt:
            candidates = [n for n in candidates if manifest.targets[n].format == fmt]
    if quantization:
        candidates = [n for n in candidates if precision_of(manifest.targets[n]) == quantization]
    elif want:
        candidates = [n for n in candidates if precision_of(manifest.targets[n]) == want]
    if not candidates:
        asked = " ".join(x for x in (f"--model-type {fmt}" if fmt else "", f"--quantization {quantization}"
                                     if quantization else "", f"--dtype {dtype}" if want and not quantization else "",
                                     f"--target {target}" if target else "") if x)
        raise ModelSourceError(f"artifact {manifest.name!r} has no valid target matching {asked}; it has: "
                               f"{_describe_targets(manifest)}. Pick one of those, or rebuild with a target of that "
                               f"format/precision (recipe targets: - format: onnx, precision: int8)")
    order = {f: i for i, f in enumerate(TARGET_PREFERENCE)}
    chosen = min(candidates, key=lambda n: (order.get(manifest.targets[n].format, 9), candidates.index(n)))
    if quantization and want and want != "fp32":
        notes.append(f"--dtype {dtype}: the {quantization} target {chosen!r} stores its MatMul weights in "
                     f"{quantization} and computes the rest in float32; --dtype does not change that")
    return chosen


def adapter_sha256(path: Union[str, Path]) -> str:
    """The adapter hash the builder records (inferneo_build.lora): sha256 over the config's and weights' sha256."""
    path = Path(path)
    config = path / "adapter_config.json"
    weights = next((path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()), None)
    if not config.is_file() or weights is None:
        raise ModelSourceError(f"--adapter {path}: not a PEFT LoRA adapter directory (adapter_config.json + "
                               f"adapter_model.safetensors)")
    return hashlib.sha256(sha256_file(config).encode() + b"\0" + sha256_file(weights).encode()).hexdigest()


def check_adapters(manifest: Manifest, adapters: Sequence[str], where: str) -> None:
    """A prebuilt artifact carries its adapters merged in: --adapter must name exactly those."""
    if not adapters:
        return
    merged = [a.sha256 for a in manifest.source.adapters]
    asked = [adapter_sha256(a) for a in adapters]
    if asked != merged:
        have = ", ".join(Path(a.path).name for a in manifest.source.adapters) or "none"
        raise ModelSourceError(f"{where}: artifact {manifest.name!r} was built with adapters merged in: {have}; "
                               f"--adapter {', '.join(adapters)} is not what it carries. Adapters are merged at "
                               f"build time: serve the checkpoint with --adapter (compiled on demand) or build a "
                               f"recipe with source.adapters")
