"""TensorRT backend: runs `tensorrt/model.sm<arch>.plan` (see inferneo_build/exporters/tensorrt.py) on a CUDA GPU.

Device memory is torch CUDA tensors (torch is part of the `tensorrt` extra): the KV cache the runtime owns,
the step's inputs and outputs, and the engine's scratch memory. TensorRT only gets their addresses.

One step:
  * each layer's `past_key_values.{i}.key|value` input is bound in place to the cache slots
    `cache.data[i, 0|1, start:start+n]` (contiguous: [n, kv_heads, capacity, head_dim]);
  * the engine returns logits and `present.{i}.*`, the new tokens' keys/values only, into one staging tensor
    [layers, 2, n, kv_heads, S, head_dim];
  * one `scatter_` writes them into the cache at each row's positions; nothing copies the whole cache.

The engine has two optimization profiles, decode (one new token per row) and prefill; there is one execution
context per profile, both sharing one scratch buffer since they run one after the other on one stream.
All of a step's work goes on the backend's own CUDA stream (TensorRT synchronizes extra on the default
stream); the stream first waits for the default stream, where the runtime grows and compacts the cache.

`tensorrt` is imported when the backend loads, so this module imports without it.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager

import numpy as np

from ..errors import InferneoError, ManifestError, MissingExtraError
from ..manifest import IOSignature
from .base import Backend, KVCache

try:
    import torch
except ImportError:  # pragma: no cover - depends on the install
    raise MissingExtraError("TensorRT engines", "tensorrt", "torch") from None

ALIGN = 256  # IExecutionContext.setTensorAddress: "The pointer must have at least 256-byte alignment."


def _aligned(t: "torch.Tensor") -> "torch.Tensor":
    """`t`, or a copy of it when its address is not ALIGN-aligned (a cache whose slot stride is not a multiple of
    ALIGN bytes, e.g. max_sequence odd with a small head_dim; the usual capacities of 256 positions always are)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise MissingExtraError("TensorRT engines", "tensorrt", "tensorrt") from None
    except OSError as e:  # installed, but its shared libraries do not load on this host
        raise InferneoError(f"TensorRT is installed but does not load on this host: {e}") from None
    return tensorrt


def cuda_device(device: str) -> "torch.device":
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise InferneoError(f"TensorRT engines run on CUDA GPUs only; asked for device {device!r} "
                            f"(use 'cuda' or 'cuda:N')")
    if not torch.cuda.is_available():
        raise InferneoError(f"device {device!r} requested but torch {torch.__version__} sees no CUDA device")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InferneoError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device("cuda", index)


ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def engine_for(target, compute_capability: str) -> str:
    """The manifest path of the target's engine built for `compute_capability`; raises naming what exists.
    A target that records no engines (a bare engine file being served) has one engine file: that one."""
    engines = target.compatibility.get("engines") or []
    if not engines:
        plans = [f.path for f in target.files if f.path.endswith(ENGINE_SUFFIXES)]
        if len(plans) == 1:
            return plans[0]
    for e in engines:
        if e.get("compute_capability") == compute_capability:
            for f in target.files:
                if f.path.endswith("/" + e["file"]) or f.path == e["file"]:
                    return f.path
            raise ManifestError(f"engine {e['file']!r} is in the manifest's compatibility list but not in its files")
    built = ", ".join(f"{e.get('compute_capability')} ({e.get('gpu')})" for e in engines) or "none recorded"
    raise InferneoError(f"no TensorRT engine for compute capability {compute_capability} in this artifact; "
                        f"it has engines for: {built}")


class TensorRTBackend(Backend):
    format = "tensorrt"

    # -- lifecycle --------------------------------------------------------------------------------
    def _load_impl(self) -> None:
        io = self.target.io or IOSignature(inputs=[], outputs=[], kv_layout="per_layer")  # bare engine: default names
        if io.kv_layout != "per_layer":
            raise ManifestError(f"{self.artifact_dir}: the tensorrt target must declare a per_layer KV layout")
        trt = import_tensorrt()
        self._device = cuda_device(self.device)
        cc = "%d.%d" % torch.cuda.get_device_capability(self._device)
        path = self.artifact_dir / engine_for(self.target, cc)
        self.compute_capability = cc
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        self.engine_path = path
        self._kv_names = [(io.kv_input.format(l, kv), io.kv_output.format(l, kv))
                          for l in range(self.dims.num_layers) for kv in ("key", "value")]
        with torch.cuda.device(self._device):
            self._stream = torch.cuda.Stream(self._device)
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                built = self.target.toolchain.get("tensorrt", "an unknown version")
                raise InferneoError(f"{path}: TensorRT {trt.__version__} could not deserialize this engine "
                                    f"(built with TensorRT {built}; see TensorRT's log above)")
            self._engine = engine
            self._dtypes = self._tensor_dtypes(trt, engine)
            missing = [name for pair in self._kv_names for name in pair if name not in self._dtypes]
            missing += [name for name in ("input_ids", "position_ids", "attention_mask", "logits")
                        if name not in self._dtypes]
            if missing:
                raise ManifestError(f"{path}: engine lacks tensors {missing[:3]}; it has {sorted(self._dtypes)[:6]}...")
            self._cache_dtype = self._dtypes[self._kv_names[0][0]]
            self._profiles = self._profile_ranges(engine)
            self._contexts = self._make_contexts(trt, engine)
        self._bound: list[dict[str, tuple]] = [{} for _ in self._contexts]

    def _close_impl(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._stream.synchronize()
        self._contexts = self._scratch = self._engine = self._runtime = self._stream = None

    @staticmethod
    def _tensor_dtypes(trt, engine) -> dict[str, "torch.dtype"]:
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "BF16"):
            to_torch[trt.DataType.BF16] = torch.bfloat16
        out = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            out[name] = to_torch[engine.get_tensor_dtype(name)]
        return out

    @staticmethod
    def _profile_ranges(engine) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per profile: (min, max) of input_ids' (batch, sequence), to pick the profile a step fits."""
        ranges = []
        for p in range(engine.num_optimization_profiles):
            lo, _, hi = engine.get_tensor_profile_shape("input_ids", p)
            ranges.append(((lo[0], lo[1]), (hi[0], hi[1])))
        return ranges

    def _make_contexts(self, trt, engine) -> list:
        """One execution context per profile, all on one scratch buffer (they never run concurrently)."""
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        size = engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size
        with torch.cuda.stream(self._stream):
            self._scratch = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self._device)
        contexts = []
        for p in range(engine.num_optimization_profiles):
            ctx = engine.create_execution_context(strategy)
            if ctx is None:
                raise InferneoError(f"{self.engine_path}: TensorRT could not create an execution context")
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            else:  # TensorRT < 10.1
                ctx.device_memory = self._scratch.data_ptr()
            if p > 0 and not ctx.set_optimization_profile_async(p, self._stream.cuda_stream):
                raise InferneoError(f"{self.engine_path}: could not select optimization profile {p}")
            contexts.append(ctx)
        self._stream.synchronize()
        return contexts

    # -- inference --------------------------------------------------------------------------------
    def _zeros(self, shape: tuple) -> "torch.Tensor":
        # on the default stream, like every other operation the runtime does on the cache
        return torch.zeros(shape, dtype=self._cache_dtype, device=self._device)

    def _profile_for(self, n: int, steps: int) -> int:
        for p, ((b0, s0), (b1, s1)) in enumerate(self._profiles):
            if b0 <= n <= b1 and s0 <= steps <= s1:
                return p
        raise InferneoError(f"no optimization profile of {self.engine_path.name} takes batch {n} × {steps} new tokens; "
                            f"profiles: {self._profiles}")

    def _forward_impl(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray) -> np.ndarray:
        n, steps = input_ids.shape
        profile = self._profile_for(n, steps)
        data = cache.data
        layers, _, _, kv_heads, _, head_dim = data.shape
        with self._on_stream():
            ids = torch.from_numpy(input_ids).to(self._device, non_blocking=True)
            past = torch.from_numpy(past_lengths).to(self._device, non_blocking=True)
            positions = past[:, None] + torch.arange(steps, device=self._device)
            total = int(past_lengths.max()) + steps
            mask = torch.arange(total, device=self._device)[None] < (past + steps)[:, None]
            logits = torch.empty((n, steps, self.dims.vocab), dtype=self._dtypes["logits"], device=self._device)
            new_kv = self._staging((layers, 2, n, kv_heads, steps, head_dim), data.dtype)
            inputs = {"input_ids": ids.to(self._dtypes["input_ids"]),
                      "position_ids": positions.to(self._dtypes["position_ids"]),
                      "attention_mask": mask.to(self._dtypes["attention_mask"])}
            outputs = {"logits": logits}
            for idx, (past_name, present_name) in enumerate(self._kv_names):
                inputs[past_name] = _aligned(data[idx // 2, idx % 2, start:start + n])
                outputs[present_name] = new_kv[idx // 2, idx % 2]
            self._execute(profile, inputs, outputs)
            # the new tokens' keys/values into the cache, each row at its own positions
            index = positions.view(1, 1, n, 1, steps, 1).expand(layers, 2, n, kv_heads, steps, head_dim)
            data[:, :, start:start + n].scatter_(4, index, new_kv)
            host = logits.float().cpu()  # waits for the step's work
        return host.numpy()

    def _staging(self, shape: tuple, dtype) -> "torch.Tensor":
        """[layers, 2, ...] whose every [layer, key|value] block starts ALIGN-aligned (TensorRT's address rule)."""
        layers, two, *rest = shape
        itemsize = torch.tensor([], dtype=dtype).element_size()
        stride = -(-math.prod(rest) * itemsize // ALIGN) * ALIGN // itemsize  # a block, rounded up to ALIGN bytes
        flat = torch.empty(layers * two * stride, dtype=dtype, device=self._device)
        inner = [math.prod(rest[i + 1:]) for i in range(len(rest))]  # each block is contiguous
        return flat.as_strided(shape, (two * stride, stride, *inner))

    @contextmanager
    def _on_stream(self):
        """Run a step on this backend's stream, ordered after and before the default stream's cache work."""
        default = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(default)
        try:
            with torch.cuda.device(self._device), torch.cuda.stream(self._stream), torch.inference_mode():
                yield
        finally:
            default.wait_stream(self._stream)

    def _execute(self, profile: int, inputs: dict[str, "torch.Tensor"], outputs: dict[str, "torch.Tensor"]) -> None:
        """Bind and run one step: set_input_shape + set_tensor_address (only what changed), then execute_async_v3."""
        ctx, bound = self._contexts[profile], self._bound[profile]
        for name, t in inputs.items():
            if t.dtype != self._dtypes[name] or not t.is_contiguous():
                raise InferneoError(f"input {name}: {t.dtype} {tuple(t.shape)} (contiguous={t.is_contiguous()}) "
                                    f"but the engine takes {self._dtypes[name]}, contiguous")
            shape, ptr = tuple(t.shape), t.data_ptr()
            was = bound.get(name)
            if was is None or was[0] != shape:
                if not ctx.set_input_shape(name, shape):
                    raise InferneoError(f"input {name}: shape {shape} is outside the engine's profile {profile}")
            if was is None or was[1] != ptr:
                self._set_address(ctx, name, ptr)
            bound[name] = (shape, ptr)
        for name, t in outputs.items():
            if bound.get(name, (None, None))[1] != t.data_ptr():
                self._set_address(ctx, name, t.data_ptr())
                bound[name] = (None, t.data_ptr())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise InferneoError(f"TensorRT execute_async_v3 failed on {self.engine_path.name} (see TensorRT's log)")

    @staticmethod
    def _set_address(ctx, name: str, ptr: int) -> None:
        if not ctx.set_tensor_address(name, ptr):
            raise InferneoError(f"TensorRT refused the address of {name} ({ptr:#x}; it must be {ALIGN}-byte aligned)")
