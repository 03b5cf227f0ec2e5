"""A bare exported model file (model.onnx, model.pt, model.plan): no manifest, so one is synthesized. Its IO is
read from the graph (ONNX) and its dims from the graph and config.json; it is served unvalidated, and the model
info says so."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..manifest import (FileEntry, GenerationDefaults, IOSignature, Manifest, ModelDims, SCHEMA_VERSION, ShapeBounds,
                        SourceInfo, TargetEntry, TensorSpec, ValidationSummary, sha256_file)
from ..model_config import DTYPES
from .common import (DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQUENCE, DTYPE_NAMES, DTYPE_PRECISION, ModelSourceError,
                     Resolved, ServeOptions, local_path, served_name)

BARE_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".plan": "tensorrt",
                 ".engine": "tensorrt", ".trt": "tensorrt"}
UNVALIDATED = ("served unvalidated: a bare model file, not a built artifact (no manifest, no checksums, no "
               "goldens); build it with `inferneo build` for a validated artifact")


@dataclass
class BareFile(Resolved):
    kind = "file"

    tokenizer_dir: Optional[Path] = None

    @classmethod
    def matches(cls, spec) -> bool:
        return local_path(spec).is_file()

    @classmethod
    def resolve(cls, spec, options: ServeOptions) -> "BareFile":
        path = local_path(spec)
        if options.trusted_keys:
            raise ModelSourceError(f"{spec.path}: a bare model file carries no signature, and trusted keys are "
                                   f"configured; serve a signed artifact (inferneo build --sign)")
        max_model_len, max_batch_size = options.max_model_len, options.max_batch_size
        fmt = _file_format(spec, path)
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
            raise ModelSourceError(f"{path}: --dtype {spec.dtype}: this file computes in "
                                   f"{DTYPE_NAMES.get(have, have)}; a bare model file is served as it is")
        entries = [FileEntry(path=f, sha256=sha256_file(root / f), size=(root / f).stat().st_size) for f in files]
        max_positions = dims.max_positions
        max_sequence = min(max_model_len or max_positions, max_positions)
        notes = [UNVALIDATED]
        if max_model_len and max_model_len > max_positions:
            notes.append(f"--max-model-len {max_model_len} exceeds the model's {max_positions} positions; serving "
                         f"{max_positions}")
        target = TargetEntry(format=fmt, status="valid", files=entries, dtype=_weights_dtype(io), io=io,
                             shapes=ShapeBounds(max_batch=max_batch_size or DEFAULT_MAX_BATCH,
                                                max_sequence=max_sequence),
                             validation=ValidationSummary(status="skipped", reason=UNVALIDATED))
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        built = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        name = spec.name or (root.name if path.stem in ("model", "decoder_model", "model_merged") else path.stem)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, name=served_name(name), task="text-generation",
            architecture=dims.model_type, model=dims,
            source=SourceInfo(kind="path", uri=str(path.resolve()), weights_sha256=entries[0].sha256),
            generation=GenerationDefaults(eos_token_ids=eos_ids, bos_token_id=config.get("bos_token_id"),
                                          pad_token_id=config.get("pad_token_id")),
            root_files=[], targets={fmt: target}, goldens=[], toolchain={}, built_at=built, recipe_sha256="",
            inferneo_version="")
        return cls(name=name, source=str(spec.path), root=root, manifest=manifest, target=fmt,
                   weight_bytes=sum(e.size for e in entries), validated=False, notes=notes, tokenizer_dir=tok_dir)

    def load(self, device: str = "cpu", threads: Optional[int] = None):
        from ..artifact import Model
        from ..backends import backend_class
        from ..tokenizer import Tokenizer

        entry = self.manifest.targets[self.target]
        backend = backend_class(entry.format)(self.root, entry, self.manifest.model, device=device, threads=threads)
        tokenizer = Tokenizer(self.tokenizer_dir)
        backend.load()
        return Model(self.root, self.manifest, self.target, backend, tokenizer)


def _file_format(spec, path: Path) -> str:
    """The file's format, from --model-type or its suffix; the flags a bare file cannot honour are refused."""
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
    return fmt


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

