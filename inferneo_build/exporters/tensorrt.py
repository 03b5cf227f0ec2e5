"""TensorRT engine target: a standard-ops ONNX graph of the project's decoder, built into one engine per GPU
architecture with Polygraphy's loaders, on a host with TensorRT and an NVIDIA GPU of each architecture.

The build is a chain of lazy loaders (STYLE.md section 2); each stores its arguments and works when called:

    OnnxFromDecoder(spec, weights, shapes, precision, path)           -> path of model.onnx (standard ops only)
      NetworkFromOnnxPath(onnx, strongly_typed=True)                  -> (builder, network, parser)
        CreateConfig(profiles=[decode, prefill], load_timing_cache)   -> IBuilderConfig
          EngineBytesFromNetwork(network, config, save_timing_cache)  -> serialized engine
            SaveBytes(engine_bytes, model.sm<cc>.plan)                -> the same bytes, now on disk

Why a second ONNX graph: the `onnx` target uses onnxruntime contrib ops (com.microsoft GroupQueryAttention,
Skip*Normalization) that TensorRT's parser rejects. This graph is `torch.onnx.export` of the decoder the TorchScript
and .pt2 targets are built from (`torch_decoder.Decoder`, portable: plain ops) over the same canonical weights,
except that it reads the KV cache and returns only the new keys/values instead of writing the cache in place:

    inputs   input_ids [batch, sequence] int64, position_ids [batch, sequence] int64,
             attention_mask [batch, total_sequence] int64 (its length T is what is attended over),
             past_key_values.{i}.key|value [batch, kv_heads, capacity, head_dim]  (a cache slot range, read-only)
    outputs  logits [batch, sequence, vocab] float32,
             present.{i}.key|value [batch, kv_heads, sequence, head_dim]  (the new tokens' entries only)

The runtime binds each layer's past to its cache slots in place and scatters `present` into the cache at
the new positions (inferneo_runtime/backends/tensorrt.py), so no step copies the whole cache.

Precision lives in the graph (strongly typed network), not in builder flags: TensorRT 10.12 deprecated the
FP16/BF16 builder flags and TensorRT 11 removed them. For fp16/bf16 the matrices, embeddings and KV cache
are in that type while norms and softmax run in float32; logits are always float32.

Without TensorRT, Polygraphy or a CUDA GPU of each requested architecture this raises TargetUnavailable
with the reason (a recipe turns that into a recorded skip with `optional: true`). It never writes a fake engine.
"""
from __future__ import annotations

import importlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from inferneo_runtime.manifest import IOSignature, TensorSpec

from ..architectures import DecoderSpec
from . import ExportResult, TargetUnavailable

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
ENGINE_NAME = "model.sm{arch}.plan"  # one per compute capability: model.sm80.plan, model.sm90.plan
OPSET = 17
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The shapes TensorRT tunes kernels for, clipped to the recipe's bounds. Decode (one new token per row) and
# prefill (a prompt, one request at a time: the generation loop prefills each request alone) get a profile each.
OPT_PROMPT, OPT_CONTEXT = 128, 512
_TIMING_CACHE = "timing.cache"


# -- toolchain and GPUs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    compute_capability: str  # "8.9"

    @property
    def arch(self) -> str:
        return self.compute_capability.replace(".", "")


def tensorrt_version() -> str:
    """The installed TensorRT's version; TargetUnavailable when it cannot be imported."""
    try:
        import tensorrt
    except ImportError:
        raise TargetUnavailable("TensorRT is not installed on this host (pip install 'inferneo[tensorrt]' on a "
                                "machine with an NVIDIA GPU); the tensorrt target needs its builder") from None
    except OSError as e:  # the wheel is there but its libraries do not load (no CUDA runtime, wrong driver, ...)
        raise TargetUnavailable(f"TensorRT is installed but does not load on this host: {e}") from None
    return str(tensorrt.__version__)


def cuda_gpus() -> list[GPU]:
    """The CUDA devices torch sees (the engine build runs on them); [] when there are none."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [GPU(i, torch.cuda.get_device_name(i), "%d.%d" % torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def no_gpu_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def build_devices(gpu_archs: Sequence[str], gpus: Sequence[GPU]) -> list[GPU]:
    """One GPU per compute capability to build for: the recipe's `gpu_archs`, or the first GPU when it names none.

    TensorRT tunes an engine on the GPU that builds it and the engine runs on that architecture only, so each
    requested architecture needs a GPU of that architecture on this host.
    """
    if not gpus:
        raise TargetUnavailable("no CUDA GPU on this host; TensorRT builds engines on the GPU they are for")
    if not gpu_archs:
        return [gpus[0]]
    by_cc: dict[str, GPU] = {}
    for g in gpus:
        by_cc.setdefault(g.compute_capability, g)
    missing = [a for a in gpu_archs if a not in by_cc]
    if missing:
        have = ", ".join(f"cuda:{g.index} {g.name} (compute capability {g.compute_capability})" for g in gpus)
        raise TargetUnavailable(f"the recipe asks for TensorRT engines for compute capability "
                                f"{', '.join(missing)}, but this host has {have}; an engine is built on a GPU of "
                                f"the architecture it is for")
    return [by_cc[a] for a in dict.fromkeys(gpu_archs)]


def _require_polygraphy() -> str:
    try:
        polygraphy = importlib.import_module("polygraphy")
        importlib.import_module("polygraphy.backend.trt")
    except ImportError:
        raise TargetUnavailable("Polygraphy is not installed (pip install 'inferneo[tensorrt]'); the tensorrt "
                                "target builds its engines with it") from None
    return str(polygraphy.__version__)


def timing_cache_path(trt_version: str, gpu: GPU) -> Path:
    """$INFERNEO_CACHE_DIR/tensorrt/<TensorRT version>-sm<arch>/timing.cache.

    A timing cache holds kernel timings of one GPU model and TensorRT version, so there is one per pair;
    Polygraphy reads and merges-then-writes it under an exclusive lock on `<path>.lock`.
    """
    from ..source import cache_root

    path = cache_root() / "tensorrt" / f"{trt_version}-sm{gpu.arch}" / _TIMING_CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# -- the standard-ops decoder ---------------------------------------------------------------------------
def _decoder_module(spec: DecoderSpec, weights: dict[str, np.ndarray], max_sequence: int, precision: str):
    """The project's decoder (`torch_decoder.Decoder`, portable: in ops every ONNX opset-17 exporter and TensorRT's
    parser take, norms in float32) over the canonical weights in `precision`, behind this graph's explicit KV in/out
    (see the module docstring)."""
    import torch

    from .torch_decoder import Decoder

    extra = spec.non_uniform_features()
    if "layers.0.attn_norm.weight" not in weights or any(k.endswith("post_attn_norm.weight") for k in weights):
        extra.append("post / sandwich norms")
    if extra:
        raise ValueError(f"the tensorrt exporter builds uniform Llama / GPT-2 layers only; this {spec.model_type} "
                         f"checkpoint uses: {', '.join(extra)} (use the onnx or torchscript target)")

    class PerLayerDecoder(torch.nn.Module):
        """(input_ids, position_ids, attention_mask, *past keys and values per layer) -> (logits of every
        position in float32, *the step's keys and values per layer)."""

        def __init__(self):
            super().__init__()
            self.decoder = Decoder(spec, weights, max_sequence, writes_cache=False, portable=True)

        def forward(self, input_ids, position_ids, attention_mask, *past):
            caches = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, new_kv = self.decoder.decode(input_ids, position_ids, attention_mask, caches)
            return (logits.float(), *[t for kv in new_kv for t in kv])

    model = PerLayerDecoder().eval()
    model.decoder.cast(getattr(torch, PRECISION_DTYPES[precision]))
    return model


def io_signature(spec: DecoderSpec, precision: str) -> IOSignature:
    kv_dtype = PRECISION_DTYPES[precision]
    from .torch_decoder import token_inputs  # torch_decoder imports torch: this module does so only when it exports

    inputs = token_inputs()
    outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", spec.vocab])]
    for i in range(spec.num_layers):
        for kv in ("key", "value"):
            inputs.append(TensorSpec(name=f"past_key_values.{i}.{kv}", dtype=kv_dtype,
                                     shape=["batch", spec.kv_heads, "capacity", spec.head_dim]))
            outputs.append(TensorSpec(name=f"present.{i}.{kv}", dtype=kv_dtype,
                                      shape=["batch", spec.kv_heads, "sequence", spec.head_dim]))
    return IOSignature(inputs=inputs, outputs=outputs, kv_layout="per_layer")


def _example_inputs(spec: DecoderSpec, dtype) -> tuple:
    from .torch_decoder import example_inputs

    ids, positions, mask, cache, _ = example_inputs(spec, cache_dtype=dtype)
    return (ids, positions, mask, *[cache[i, j] for i in range(spec.num_layers) for j in range(2)])


class OnnxFromDecoder:
    """Loader: export the standard-ops decoder to `path` (+ one external-data file) once; returns the path."""

    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], max_sequence: int, precision: str,
                 path: Path):
        self.spec, self.weights, self.max_sequence, self.precision = spec, weights, max_sequence, precision
        self.path = Path(path)
        self._done = False

    def __call__(self) -> str:
        if not self._done:
            self._export()
            self._done = True
        return str(self.path)

    def _export(self) -> None:
        import onnx
        import torch

        from .torch_decoder import table_length

        spec = self.spec
        rope_length = table_length(spec, self.max_sequence)
        io = io_signature(spec, self.precision)
        dtype = getattr(torch, PRECISION_DTYPES[self.precision])
        axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in io.inputs + io.outputs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp, torch.inference_mode(False), torch.no_grad(), \
                warnings.catch_warnings():
            model = _decoder_module(spec, self.weights, rope_length, self.precision)
            raw = Path(tmp) / ONNX_NAME
            # the TorchScript-based exporter on purpose: the dynamo one needs onnxscript and may emit opset-23
            # Attention, which TensorRT 10's parser does not take
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            torch.onnx.export(model, _example_inputs(spec, dtype), str(raw), dynamo=False, opset_version=OPSET,
                              input_names=[t.name for t in io.inputs], output_names=[t.name for t in io.outputs],
                              dynamic_axes=axes, do_constant_folding=True)
            del model
            proto = onnx.load(str(raw))  # pulls in whatever external data the exporter wrote
        for f in (self.path, self.path.with_name(DATA_NAME)):
            f.unlink(missing_ok=True)
        onnx.save_model(proto, str(self.path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_NAME, size_threshold=1024)
        self.path.with_name(DATA_NAME).chmod(self.path.stat().st_mode & 0o777)  # onnx writes it 0600
        onnx.checker.check_model(str(self.path))
        foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:  # TensorRT's parser reads the standard domain only
            raise RuntimeError(f"{self.path}: the TensorRT graph uses non-standard op domains {foreign}")


# -- optimization profiles --------------------------------------------------------------------------------
def profile_shapes(spec: DecoderSpec, shapes) -> list[dict[str, dict[str, list[int]]]]:
    """[decode, prefill]: input name -> {"min", "opt", "max"} shapes, from the recipe's batch and sequence bounds.

    batch 1..max_batch; sequence 1 (decode) or 2..max_sequence (prefill); total_sequence (the attention_mask
    length T) 1..max_sequence; capacity (the cache's position axis) 1..max_sequence.
    """
    batch, longest = shapes.max_batch, shapes.max_sequence
    prompt, context = min(OPT_PROMPT, longest), min(OPT_CONTEXT, longest)
    kv, hd = spec.kv_heads, spec.head_dim

    def profile(b: tuple, s: tuple, t: tuple, cap: tuple) -> dict:
        io = {"input_ids": [[b[i], s[i]] for i in range(3)], "position_ids": [[b[i], s[i]] for i in range(3)],
              "attention_mask": [[b[i], t[i]] for i in range(3)]}
        for i in range(spec.num_layers):
            for name in ("key", "value"):
                io[f"past_key_values.{i}.{name}"] = [[b[j], kv, cap[j], hd] for j in range(3)]
        return {name: dict(zip(("min", "opt", "max"), v)) for name, v in io.items()}

    decode = profile((1, batch, batch), (1, 1, 1), (1, context, longest), (1, context, longest))
    prefill = profile((1, 1, batch), (2, prompt, longest), (2, prompt, longest), (1, prompt, longest))
    return [decode, prefill]


def _summary(profile: dict) -> dict:
    """The manifest's compact view of a profile: the symbolic dims' ranges."""
    ids, mask = profile["input_ids"], profile["attention_mask"]
    cap = profile.get("past_key_values.0.key", {"min": [0, 0, 0], "opt": [0, 0, 0], "max": [0, 0, 0]})
    return {"batch": [ids["min"][0], ids["opt"][0], ids["max"][0]],
            "sequence": [ids["min"][1], ids["opt"][1], ids["max"][1]],
            "total_sequence": [mask["min"][1], mask["opt"][1], mask["max"][1]],
            "capacity": [cap["min"][2], cap["opt"][2], cap["max"][2]]}


# -- the export ---------------------------------------------------------------------------------------------
def export_tensorrt(spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path) -> ExportResult:
    precision = getattr(target, "precision", "fp16")
    gpu_archs = list(getattr(target, "gpu_archs", None) or [])
    trt_version = tensorrt_version()
    gpus = cuda_gpus()
    if not gpus:
        raise TargetUnavailable(f"no CUDA GPU on this host ({no_gpu_reason()}); TensorRT builds engines on the "
                                f"GPU they are for")
    devices = build_devices(gpu_archs, gpus)
    polygraphy_version = _require_polygraphy()

    import onnx
    import torch
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_loader = OnnxFromDecoder(spec, weights, shapes.max_sequence, precision, out / ONNX_NAME)
    profiles = profile_shapes(spec, shapes)
    engines, files = [], []
    for gpu in devices:
        engine_path = out / ENGINE_NAME.format(arch=gpu.arch)
        timing = str(timing_cache_path(trt_version, gpu))
        trt_profiles = [Profile() for _ in profiles]
        for trt_profile, shapes_by_name in zip(trt_profiles, profiles):
            for name, s in shapes_by_name.items():
                trt_profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
        network = NetworkFromOnnxPath(onnx_loader, strongly_typed=True)
        config = CreateConfig(profiles=trt_profiles, load_timing_cache=timing)
        build = SaveBytes(EngineBytesFromNetwork(network, config, save_timing_cache=timing), str(engine_path))
        severity = G_LOGGER.module_severity
        G_LOGGER.module_severity = G_LOGGER.WARNING  # Polygraphy's INFO lines would flood the build's progress
        try:
            with torch.cuda.device(gpu.index):  # TensorRT builds for the current CUDA device
                build()
        except PolygraphyException as e:
            raise RuntimeError(f"building the TensorRT {trt_version} engine on cuda:{gpu.index} {gpu.name} "
                               f"(compute capability {gpu.compute_capability}) failed: {e}") from None
        finally:
            G_LOGGER.module_severity = severity
        engines.append({"file": engine_path.name, "compute_capability": gpu.compute_capability, "gpu": gpu.name})
        files.append(engine_path.resolve())
    onnx_path = Path(onnx_loader())
    return ExportResult(
        files=[onnx_path.resolve(), onnx_path.with_name(DATA_NAME).resolve(), *files],
        io=io_signature(spec, precision), dtype=PRECISION_DTYPES[precision],
        toolchain={"tensorrt": trt_version, "polygraphy": polygraphy_version, "torch": torch.__version__,
                   "cuda": str(torch.version.cuda), "onnx": onnx.__version__, "opset": str(OPSET)},
        compatibility={"tensorrt": trt_version, "precision": precision,
                       "compute_capabilities": [e["compute_capability"] for e in engines], "engines": engines,
                       "profiles": [dict(name=name, **_summary(p)) for name, p in zip(("decode", "prefill"), profiles)]},
    )
