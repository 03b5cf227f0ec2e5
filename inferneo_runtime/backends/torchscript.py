"""TorchScript backend: runs `torchscript/model.pt` over a torch KV cache the runtime owns.

Imported only when a torchscript target is chosen; it is the one runtime module that imports torch.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from ..errors import InferneoError, ManifestError, MissingExtraError
from ..sampling import SamplingParams
from .base import Backend, KVCache, physical_cores, small_page_zeros
from .decode_graph import DecodeGraphs, default_mode

try:
    import torch
except ImportError:  # pragma: no cover - depends on the install
    raise MissingExtraError("TorchScript artifacts", "torchscript", "torch") from None
from .torch_sampling import DeviceDraw  # (needs torch)

# torch >= 2.9 deprecates every torch.jit entry point ("`torch.jit.load` is deprecated. Please switch to ...").
_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextmanager
def quiet_jit():
    """Silence exactly torch's torch.jit deprecation warnings; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=DeprecationWarning)
        yield


def _torch_device(device: str) -> "torch.device":
    if device == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise InferneoError(f"device {device!r} is not supported by the TorchScript backend; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise InferneoError(f"device {device!r} requested but torch {torch.__version__} sees no CUDA device")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InferneoError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(device)


class TorchScriptBackend(Backend):
    format = "torchscript"

    def _load_impl(self) -> None:
        io = self.target.io
        if io is not None and io.kv_layout != "stacked":
            raise ManifestError(f"TorchScript target declares kv_layout {io.kv_layout!r}; this backend runs 'stacked'")
        self._device = _torch_device(self.device)
        # the KV cache's dtype as the target declares it: float32, or the compute dtype of a bf16/fp16 target
        declared = {t.name: t.dtype for t in io.inputs} if io is not None else {}
        self._cache_dtype = getattr(torch, declared.get("kv_cache", "float32"))
        torch.set_num_threads(int(self.threads or physical_cores()))
        # models traced before `logit_positions` existed take four inputs and return every position's logits
        self.supports_last_only = io is not None and any(t.name == "logit_positions" for t in io.inputs)
        path = self.model_file(".pt")
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        with quiet_jit():
            self._module = torch.jit.load(str(path), map_location=self._device).eval()
        if io is None:  # a bare model.pt (no manifest): its own forward() and weights say what it takes
            self.supports_last_only = any(a.name == "logit_positions" for a in self._module.forward.schema.arguments)
            weights = [t for t in self._module.parameters() if t.is_floating_point()]
            self._cache_dtype = weights[0].dtype if weights else torch.float32
        self._last_position = torch.zeros(1, dtype=torch.int64, device=self._device)
        self.decode_graphs = DecodeGraphs(self._static_step, "off")  # (on, after the warm-up: see below)
        # TorchScript's profiling executor profiles the first call and optimizes on the second (~0.4 s each
        # for a 135M model); pay that here rather than in the first request's latency.
        scratch = KVCache(self._zeros, self.dims.num_layers, self.dims.kv_heads, self.dims.head_dim,
                          batch=1, capacity=2, max_capacity=2)
        for past in range(2):
            self._forward_impl(scratch, 0, np.zeros((1, 1), dtype=np.int64), np.array([past], dtype=np.int64))
        # graphs are captured over the engines' caches, not this scratch one
        self.decode_graphs = DecodeGraphs(self._static_step, default_mode(self._device))

    def _close_impl(self) -> None:
        # Drop every tensor this backend made now: the decode graphs' steps are bound to this backend (a reference
        # cycle), so they and their buffers (a GPU's graph memory pool) would otherwise wait for garbage collection.
        self._module = self.decode_graphs = self._last_position = None
        if getattr(self, "_device", None) is not None and self._device.type == "cuda":
            torch.cuda.empty_cache()  # and hand the freed blocks back to the device, for the next model's load

    def _zeros(self, shape: tuple) -> "torch.Tensor":
        if self._device.type != "cpu":
            return torch.zeros(shape, dtype=self._cache_dtype, device=self._device)
        # On the CPU, freshly mapped memory is zero already and paged in as positions are written; torch.zeros
        # writes every byte first (34 ms for SmolLM2's 2048-position cache, on each request that finds the
        # engine idle). numpy has no bfloat16, so 16-bit caches are allocated as uint16 and viewed.
        element = torch.empty((), dtype=self._cache_dtype).element_size()
        raw = small_page_zeros(shape, {4: np.float32, 2: np.uint16}[element])
        return torch.from_numpy(raw).view(self._cache_dtype)

    def _step_inputs(self, input_ids: np.ndarray, past_lengths: np.ndarray) -> list:
        """input_ids, position_ids and attention_mask on the device, for rows at `past_lengths`."""
        steps = input_ids.shape[1]
        positions = past_lengths[:, None] + np.arange(steps)
        total = past_lengths + steps
        attention_mask = (np.arange(int(total.max()))[None] < total[:, None]).astype(np.int64)
        return [torch.from_numpy(a).to(self._device) for a in (input_ids, positions, attention_mask)]

    def _logit_positions(self, steps: int, last_only: bool) -> "torch.Tensor":
        picked = np.array([steps - 1]) if last_only else np.arange(steps)
        return torch.from_numpy(picked).to(self._device)

    def _forward_impl(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                      last_only: bool = False) -> np.ndarray:
        with torch.inference_mode():
            return self._device_logits(cache, start, input_ids, past_lengths, last_only).float().cpu().numpy()

    def _tokens_impl(self, cache: KVCache, start: int, ids: np.ndarray, past: np.ndarray,
                     params: Sequence[SamplingParams], uniforms: np.ndarray) -> np.ndarray:
        if self._device.type == "cpu":  # logits in host memory: numpy's draw is faster there (0.3 ms vs torch's 1.2)
            return super()._tokens_impl(cache, start, ids, past, params, uniforms)
        with torch.inference_mode():
            draw = DeviceDraw(params, uniforms, self._device)  # (its inputs sent before the step)
            return draw.tokens(self._device_logits(cache, start, ids, past, True)[:, -1])  # [n] tokens cross back

    def _device_logits(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                       last_only: bool) -> "torch.Tensor":
        logits = self.decode_graphs.run(cache, start, input_ids, past_lengths)
        if logits is None:  # a prefill or a draft's verification: shapes as long as the rows are
            ids, positions, mask = self._step_inputs(input_ids, past_lengths)
            steps = input_ids.shape[1]
            logits = self._call(ids, positions, mask, cache.data, start, self._logit_positions(steps, last_only))
        return logits

    def _static_step(self, ids, positions, mask, cache, start: int) -> "torch.Tensor":
        return self._call(ids, positions, mask, cache, start, self._last_position)

    def _call(self, ids, positions, mask, cache, start: int, logit_positions) -> "torch.Tensor":
        """The module over rows [start, start + n) of the whole cache tensor; logits on the device."""
        inputs = [ids, positions, mask, cache[:, :, start:start + ids.shape[0]]]
        if self.supports_last_only:
            inputs.append(logit_positions)
        logits, _ = self._module(*inputs)
        return logits
