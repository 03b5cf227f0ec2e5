"""What `--model` (or `ModelManager.register`) accepts, resolved into something the registry can serve.

    artifact directory or s3:// URI   the normal path: manifest verified, a target chosen
    HF checkpoint directory, hub id    compiled on demand (`inferneo build` with a recipe made here, output under
                                       $INFERNEO_CACHE_DIR/served/<name>; the build cache makes a restart free)
    model.onnx / model.pt / model.plan a bare exported file: its IO is read from the graph (ONNX) and its dims
                                       from the graph and config.json; served unvalidated, and the model info
                                       says so
    --model-class module:Class         a CustomModel subclass (inferneo_runtime.models)

`resolve(spec, ...)` does the cheap part (read manifests, pick a target, compile a checkpoint) and returns a
`Resolved`; `Resolved.load(device, threads)` loads it. Target choice follows --model-type, --quantization and
--dtype: the first filters by format, the second by weight precision, the third (without --quantization) by
precision too; a prebuilt artifact without a matching target is an error that lists what it has.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import InferneoError, MissingExtraError
from .model_config import DTYPES
from .manifest import (FileEntry, GenerationDefaults, IOSignature, Manifest, ModelDims, SCHEMA_VERSION, ShapeBounds,
                       SourceInfo, TargetEntry, TensorSpec, ValidationSummary, read_manifest, sha256_file)

logger = logging.getLogger("inferneo.server")

BARE_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".plan": "tensorrt",
                 ".engine": "tensorrt", ".trt": "tensorrt"}
TARGET_PREFERENCE = ("onnx", "torchscript", "pt2", "tensorrt")
# manifest dtype (the weights') -> precision, for targets written before `precision` was recorded
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype's precision -> words
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_SEQUENCE = 2048
VALIDATION_PROMPTS = ["Hello", "The quick brown fox"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
UNVALIDATED = ("served unvalidated: a bare model file, not a built artifact (no manifest, no checksums, no "
               "goldens); build it with `inferneo build` for a validated artifact")


class ModelSourceError(InferneoError):
    """A --model value cannot be served as given (wrong kind of path, no matching target, bad file)."""

    exit_code = 2
    code = "invalid_format"


@dataclass
class Resolved:
    """A model ready to be registered: where it is, what it is, and how to load it."""

    name: str
    kind: str  # artifact | checkpoint | file | custom
    source: str  # what was asked for
    root: Optional[Path] = None
    manifest: Optional[Manifest] = None
    target: Optional[str] = None
    weight_bytes: int = 0
    validated: bool = True
    notes: list[str] = field(default_factory=list)
    tokenizer_dir: Optional[Path] = None
    model_class: Optional[str] = None
    trusted_keys: Optional[list[str]] = None
    max_batch: Optional[int] = None  # caps on the engine (the artifact's bounds are the ceiling)
    max_sequence: Optional[int] = None

    def load(self, device: str = "cpu", threads: Optional[int] = None):
        if self.kind == "custom":
            return load_custom(self.model_class, self.source)
        if self.kind == "file":
            return _load_bare(self, device, threads)
        from .artifact import load

        return load(self.root, target=self.target, device=device, threads=threads, trusted_keys=self.trusted_keys)


# -- entry point ------------------------------------------------------------------------------------------
def resolve(spec, *, max_model_len: Optional[int] = None, max_batch_size: Optional[int] = None,
            trusted_keys: Optional[Sequence[str]] = None, device: str = "cpu") -> Resolved:
    """Resolve one ModelConfig (server/config.py) into a Resolved model."""
    from .signing import resolve_trusted_keys

    keys = [str(k) for k in resolve_trusted_keys(list(trusted_keys) if trusted_keys else None)] or None
    path = str(spec.path)
    if spec.model_class:
        r = _custom(spec)
    elif _is_s3(path):
        r = _artifact(spec, _fetch_s3(path), keys)
    else:
        p = Path(path).expanduser()
        if p.is_file():
            if keys:
                raise ModelSourceError(f"{path}: a bare model file carries no signature, and trusted keys are "
                                       f"configured; serve a signed artifact (inferneo build --sign)")
            r = _bare(spec, p, max_model_len, max_batch_size)
        elif p.is_dir() and (p / "inferneo.json").is_file():
            r = _artifact(spec, p, keys)
        elif p.is_dir() and (p / "config.json").is_file():
            r = _checkpoint(spec, p, None, max_model_len, max_batch_size, keys)
        elif p.is_dir():
            # (what the directory holds is not listed: over the API that would let a caller read directories)
            raise ModelSourceError(f"{path}: not an Inferneo artifact (no inferneo.json) nor a Hugging Face checkpoint "
                                   f"(no config.json). --model takes an "
                                   f"artifact directory, an s3:// URI, a checkpoint directory, a hub id, or a "
                                   f"model.onnx / model.pt / model.plan file with --model-type")
        elif HUB_ID.match(path) and not path.startswith((".", "/")):
            r = _checkpoint(spec, None, path, max_model_len, max_batch_size, keys)
        else:
            raise ModelSourceError(f"{path}: no such file or directory (nor a hub id like org/name)")
    if r.kind == "artifact":  # checkpoints were compiled, and bare files bounded, for these values
        _apply_caps(r, max_model_len, max_batch_size)
    return r


def _is_s3(path: str) -> bool:
    return path.startswith("s3://")


def _fetch_s3(uri: str) -> Path:
    from . import s3

    return Path(s3.fetch(uri))


# -- artifacts -------------------------------------------------------------------------------------------
def _artifact(spec, root: Path, keys: Optional[list[str]]) -> Resolved:
    from .artifact import check_signature

    check_signature(root, keys)  # before anything else of the artifact is read
    manifest = read_manifest(root)
    notes: list[str] = []
    target = select_target(manifest, spec.target, spec.format, spec.dtype, spec.quantization, notes)
    check_adapters(manifest, spec.adapters or [], str(spec.path))
    from .preflight import weights_bytes

    entry = manifest.targets[target]
    return Resolved(name=spec.name or manifest.name, kind="artifact", source=str(spec.path), root=root,
                    manifest=manifest, target=target, weight_bytes=weights_bytes(entry), notes=notes,
                    trusted_keys=keys)


def precision_of(entry: TargetEntry) -> str:
    return getattr(entry, "precision", None) or DTYPE_PRECISION.get(entry.dtype, entry.dtype)


def _describe_targets(manifest: Manifest) -> str:
    return ", ".join(f"{n} ({t.format} {precision_of(t)}{'' if t.status == 'valid' else ', ' + t.status})"
                     for n, t in manifest.targets.items()) or "none"


def select_target(manifest: Manifest, target: Optional[str], fmt: Optional[str], dtype: Optional[str],
                  quantization: Optional[str], notes: Optional[list] = None) -> str:
    """The target to serve: named, or the preferred valid one matching format, quantization and dtype."""
    from .artifact import choose_target
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


def _apply_caps(r: Resolved, max_model_len: Optional[int], max_batch_size: Optional[int]) -> None:
    """--max-model-len / --max-batch-size on an artifact: caps within its bounds; above them, the bound (said)."""
    shapes = r.manifest.targets[r.target].shapes
    bound_seq = shapes.max_sequence if shapes else r.manifest.model.max_positions
    bound_batch = shapes.max_batch if shapes else 1
    if max_model_len is not None:
        r.max_sequence = min(max_model_len, bound_seq)
        if max_model_len > bound_seq:
            r.notes.append(f"--max-model-len {max_model_len} exceeds the {bound_seq} tokens {r.name!r} was built "
                           f"for; serving {bound_seq} (rebuild with shapes.max_sequence: {max_model_len})")
    if max_batch_size is not None:
        r.max_batch = min(max_batch_size, bound_batch)
        if max_batch_size > bound_batch:
            r.notes.append(f"--max-batch-size {max_batch_size} exceeds the batch of {bound_batch} {r.name!r} was "
                           f"built for; running {bound_batch} sequences per step, the rest wait their turn "
                           f"(rebuild with shapes.max_batch: {max_batch_size})")


# -- checkpoints, compiled on demand ----------------------------------------------------------------------
def served_name(text: str) -> str:
    """A recipe/directory-safe name for a served model."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:128]
    return name or "model"


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


def _checkpoint(spec, directory: Optional[Path], hub_id: Optional[str], max_model_len: Optional[int],
                max_batch_size: Optional[int], keys: Optional[list[str]]) -> Resolved:
    what = str(directory) if directory is not None else f"hub id {hub_id}"
    try:
        from inferneo_build import build
        from inferneo_build.build import Progress
        from inferneo_build.recipe import Recipe
    except ImportError as e:
        raise MissingExtraError(f"{what} is a Hugging Face checkpoint, not an Inferneo artifact; compiling it on "
                                f"demand", "build", getattr(e, "name", None) or "inferneo_build") from None
    if keys:
        raise ModelSourceError(f"{what}: a checkpoint compiled on demand is not signed, and trusted keys are "
                               f"configured; build and sign it first (inferneo build RECIPE --sign KEY) and serve "
                               f"the artifact")
    from .s3 import cache_root, file_lock

    name = spec.name or (hub_id if hub_id else directory.resolve().name)
    recipe_name = served_name(name)
    notes: list[str] = []
    fmt = spec.format or "onnx"
    precision = _build_precision(fmt, spec.dtype, spec.quantization, notes)
    config = _checkpoint_config(directory, hub_id)
    max_positions = int(config.get("max_position_embeddings") or config.get("n_positions") or 0) or None
    max_sequence = max_model_len or min(DEFAULT_MAX_SEQUENCE, max_positions or DEFAULT_MAX_SEQUENCE)
    if max_positions and max_sequence > max_positions:
        notes.append(f"--max-model-len {max_sequence} exceeds {name}'s max_position_embeddings {max_positions}; "
                     f"compiled for {max_positions}")
        max_sequence = max_positions
    target = {"format": fmt}
    if fmt != "tensorrt" or precision != "fp16":
        target["precision"] = precision
    source = {"hf": hub_id} if hub_id else {"path": str(directory.resolve())}
    if spec.adapters:
        source["adapters"] = [str(Path(a).resolve()) for a in spec.adapters]
    output = cache_root() / "served" / recipe_name
    try:
        recipe = Recipe.model_validate({
            "name": recipe_name, "source": source, "targets": [target],
            "shapes": {"max_batch": max_batch_size or DEFAULT_MAX_BATCH, "max_sequence": max_sequence},
            "validation": {"prompts": VALIDATION_PROMPTS, "max_new_tokens": 16}, "output": str(output)})
    except Exception as e:  # noqa: BLE001 - pydantic's error, said in the flags' words
        raise ModelSourceError(f"{what}: cannot make a build recipe from the flags: {e}") from None
    t0 = time.perf_counter()
    logger.info("model %s: compiling %s (%s %s, max_sequence %d, max_batch %d) into %s", name, what, fmt, precision,
                max_sequence, recipe.shapes.max_batch, output)
    try:
        with file_lock(output.parent / f".{recipe_name}.lock"):  # two servers compiling one checkpoint: one builds
            result = build(recipe, output, progress=Progress(quiet=True))
    except InferneoError:
        raise
    except Exception as e:  # noqa: BLE001 - the builder's errors (recipe, source, validation), said as this model's
        lead = f"{hub_id}: no such directory, and as a hub id" if hub_id else f"compiling {what}"
        error = ModelSourceError(f"{lead}: {e}")
        error.exit_code = getattr(e, "exit_code", 2)
        raise error from None
    if result.cached:
        logger.info("model %s: compiled artifact %s is up to date (build cache); nothing rebuilt", name, output)
    else:
        logger.info("model %s: compiled in %.1fs into %s", name, time.perf_counter() - t0, output)
    r = _artifact(spec.model_copy(update={"name": name, "target": None, "format": fmt, "dtype": None,
                                          "quantization": None, "adapters": None}), output, None)
    r.kind, r.source, r.notes = "checkpoint", spec.path, notes + r.notes
    return r


# -- bare model files ------------------------------------------------------------------------------------
_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64", 16: "bfloat16"}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}
_KV = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def _onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    """Inputs, outputs and external data files of an ONNX graph, read without loading its weights when the
    onnx package is installed (else through an onnxruntime session)."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf/onnx errors: not a model file
            raise ModelSourceError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None

        def spec(v) -> TensorSpec:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            return TensorSpec(name=v.name, dtype=_ONNX_TYPES.get(t.elem_type, str(t.elem_type)), shape=dims)

        initializers = {i.name for i in model.graph.initializer}
        inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
        data = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
        return inputs, [spec(v) for v in model.graph.output], data
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error types
        raise ModelSourceError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None

    def ort_spec(a) -> TensorSpec:
        return TensorSpec(name=a.name, dtype=_ORT_TYPES.get(a.type, a.type),
                          shape=[d if isinstance(d, int) else (d or "?") for d in a.shape])

    guesses = [f"{path.name}.data", f"{path.name}_data", f"{path.stem}.onnx_data", f"{path.stem}.data"]
    data = [g for g in guesses if (path.parent / g).is_file()]
    return [ort_spec(a) for a in session.get_inputs()], [ort_spec(a) for a in session.get_outputs()], data


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _bare(spec, path: Path, max_model_len: Optional[int], max_batch_size: Optional[int]) -> Resolved:
    inferred = BARE_SUFFIXES.get(path.suffix.lower())
    fmt = spec.format or inferred
    if fmt is None:
        raise ModelSourceError(f"{path}: not a model file Inferneo knows (.onnx, .pt, .plan); pass --model-type "
                               f"onnx|torchscript|tensorrt, or give an artifact directory")
    if inferred and spec.format and inferred != spec.format:
        raise ModelSourceError(f"{path}: a {path.suffix} file is {inferred}, not --model-type {spec.format}")
    if spec.quantization or spec.adapters:
        flag = "--quantization" if spec.quantization else "--adapter"
        raise ModelSourceError(f"{path}: a bare model file is served as it is; {flag} picks among an artifact's "
                               f"targets or is applied when a checkpoint is compiled")
    root = path.parent
    tok_dir = Path(spec.tokenizer).expanduser() if spec.tokenizer else root
    if not (tok_dir / "tokenizer.json").is_file():
        raise ModelSourceError(f"{path}: no tokenizer.json in {tok_dir}; pass --tokenizer DIR (a folder with "
                               f"tokenizer.json, e.g. the artifact or checkpoint it came from)")
    config = _read_json(root / "config.json") or _read_json(tok_dir / "config.json")
    generation = _read_json(root / "generation_config.json") or _read_json(tok_dir / "generation_config.json")
    files = [path.name]
    io = None
    if fmt == "onnx":
        inputs, outputs, data = _onnx_signature(path)
        files += data
        dims = _dims_from_graph(path, inputs, outputs, config)
        io = IOSignature(inputs=inputs, outputs=outputs, kv_layout="per_layer")
    else:
        if not config:
            raise ModelSourceError(f"{path}: a bare {fmt} file does not describe its model; put the checkpoint's "
                                   f"config.json beside it (or in --tokenizer's folder)")
        dims = _dims_from_config(path, config)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ModelSourceError(f"{path}: its external data {', '.join(missing)} is missing from {root}")
    want, have = DTYPES.get(spec.dtype or "auto"), DTYPE_PRECISION.get(_weights_dtype(io), "fp32")
    if want and want != have:
        raise ModelSourceError(f"{path}: --dtype {spec.dtype}: this file computes in {DTYPE_NAMES.get(have, have)}; "
                               f"a bare model file is served as it is")
    entries = [FileEntry(path=f, sha256=sha256_file(root / f), size=(root / f).stat().st_size) for f in files]
    max_positions = dims.max_positions
    max_sequence = min(max_model_len or max_positions, max_positions)
    notes = [UNVALIDATED]
    if max_model_len and max_model_len > max_positions:
        notes.append(f"--max-model-len {max_model_len} exceeds the model's {max_positions} positions; serving "
                     f"{max_positions}")
    target = TargetEntry(format=fmt, status="valid", files=entries, dtype=_weights_dtype(io), io=io,
                         shapes=ShapeBounds(max_batch=max_batch_size or DEFAULT_MAX_BATCH, max_sequence=max_sequence),
                         validation=ValidationSummary(status="skipped", reason=UNVALIDATED))
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    built = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    name = spec.name or (root.name if path.stem in ("model", "decoder_model", "model_merged") else path.stem)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name=served_name(name), task="text-generation", architecture=dims.model_type,
        model=dims, source=SourceInfo(kind="path", uri=str(path.resolve()), weights_sha256=entries[0].sha256),
        generation=GenerationDefaults(eos_token_ids=eos_ids, bos_token_id=config.get("bos_token_id"),
                                      pad_token_id=config.get("pad_token_id")),
        root_files=[], targets={fmt: target}, goldens=[], toolchain={}, built_at=built, recipe_sha256="",
        inferneo_version="")
    return Resolved(name=name, kind="file", source=str(spec.path), root=root, manifest=manifest, target=fmt,
                    weight_bytes=sum(e.size for e in entries), validated=False, notes=notes, tokenizer_dir=tok_dir)


def _weights_dtype(io: Optional[IOSignature]) -> str:
    if io is None:
        return "float32"
    kv = [t for t in io.inputs if _KV.match(t.name)]
    return kv[0].dtype if kv else "float32"


def _dims_from_graph(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict) -> ModelDims:
    names = {t.name for t in inputs}
    if "input_ids" not in names:
        raise ModelSourceError(f"{path}: the graph has no input_ids input; inputs: {', '.join(sorted(names))}")
    keys = {int(m.group(1)): t for t in inputs if (m := _KV.match(t.name)) and m.group(2) == "key"}
    if not keys:
        raise ModelSourceError(f"{path}: the graph has no past_key_values.N.key inputs, so it has no KV cache this "
                               f"runtime can own; export a decoder with past key/values (inferneo build does)")
    layers = len(keys)
    if sorted(keys) != list(range(layers)):
        raise ModelSourceError(f"{path}: past_key_values layers {sorted(keys)} are not 0..{layers - 1}")
    out_names = {t.name for t in outputs}
    missing = [name for i in range(layers) for kv in ("key", "value")
               if (name := f"present.{i}.{kv}") not in out_names]
    missing = (["logits"] if "logits" not in out_names else []) + missing
    if missing:
        raise ModelSourceError(f"{path}: the graph lacks outputs {', '.join(missing[:3])}; it has: "
                               f"{', '.join(sorted(out_names)[:6])}")
    shape = keys[0].shape  # [batch, kv_heads, past_sequence, head_dim]
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise ModelSourceError(f"{path}: past_key_values.0.key has shape {shape}; expected [batch, kv_heads, "
                               f"past_sequence, head_dim] with fixed kv_heads and head_dim")
    kv_heads, head_dim = shape[1], shape[3]
    logits = next(t for t in outputs if t.name == "logits").shape
    vocab = logits[-1] if logits and isinstance(logits[-1], int) else config.get("vocab_size")
    if not vocab:
        raise ModelSourceError(f"{path}: the logits' vocabulary dimension is symbolic and there is no config.json "
                               f"beside the file to read vocab_size from")
    heads = int(config.get("num_attention_heads") or config.get("n_head") or kv_heads)
    return ModelDims(model_type=str(config.get("model_type") or "unknown"), family=str(config.get("model_type") or
                     "unknown"), num_layers=layers, hidden=int(config.get("hidden_size") or config.get("n_embd") or
                                                            heads * head_dim),
                     heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=int(vocab),
                     max_positions=int(config.get("max_position_embeddings") or config.get("n_positions") or
                                       DEFAULT_MAX_SEQUENCE))


def _dims_from_config(path: Path, config: dict) -> ModelDims:
    try:
        heads = int(config.get("num_attention_heads") or config["n_head"])
        hidden = int(config.get("hidden_size") or config["n_embd"])
        return ModelDims(model_type=str(config.get("model_type", "unknown")), family=str(config.get("model_type",
                         "unknown")), num_layers=int(config.get("num_hidden_layers") or config["n_layer"]),
                         hidden=hidden, heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
                         head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                         max_positions=int(config.get("max_position_embeddings") or config.get("n_positions") or
                                           DEFAULT_MAX_SEQUENCE))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelSourceError(f"{path}: config.json beside it lacks {e} to describe the model") from None


def _load_bare(r: Resolved, device: str, threads: Optional[int]):
    from .artifact import Model
    from .backends import backend_class
    from .tokenizer import Tokenizer

    entry = r.manifest.targets[r.target]
    backend = backend_class(entry.format)(r.root, entry, r.manifest.model, device=device, threads=threads)
    tokenizer = Tokenizer(r.tokenizer_dir)
    backend.load()
    return Model(r.root, r.manifest, r.target, backend, tokenizer)


# -- custom model classes --------------------------------------------------------------------------------
def import_class(spec: str):
    """`module:Class` (or module.Class) imported; the working directory is on the path, as for uvicorn apps."""
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise ModelSourceError(f"--model-class {spec!r}: expected module:Class")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelSourceError(f"--model-class {spec!r}: cannot import it: {e}") from None
    return obj


def load_custom(class_path: str, path: str):
    """Import, construct and load a custom model class; a CustomHost serves it."""
    from .models import CustomHost

    model = import_class(class_path)(path)
    model.load()
    return CustomHost(model, class_path)


def _custom(spec) -> Resolved:
    from .models import CustomModel
    if spec.quantization or spec.adapters or DTYPES.get(spec.dtype or "auto"):
        raise ModelSourceError(f"--model-class {spec.model_class}: --dtype, --quantization and --adapter apply to "
                               f"artifacts and checkpoints; a custom model class loads what it loads")
    cls = import_class(spec.model_class)
    if not (isinstance(cls, type) and issubclass(cls, CustomModel)):
        raise ModelSourceError(f"--model-class {spec.model_class!r} is not a subclass of "
                               f"inferneo_runtime.models.CustomModel")
    name = spec.name or cls.model_name or (Path(spec.path).name if spec.path not in ("", ".") else cls.__name__)
    return Resolved(name=name, kind="custom", source=str(spec.path), model_class=spec.model_class,
                    weight_bytes=int(cls.estimate_bytes(str(spec.path))), validated=False,
                    notes=[f"custom model class {spec.model_class}: generation is the class's own, not validated "
                           f"by Inferneo"])
