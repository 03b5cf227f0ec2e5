"""ONNX Runtime backend for the graphs `inferneo_build.exporters.onnx` writes.

Each layer's past and present KV are bound to the same memory, the cache's slot range
`cache.data[l, 0|1, start:start+n]`, so GroupQueryAttention appends the new keys/values in place. The KV
bindings are made once per cache buffer and slot range and reused every step; a step binds only its small
int64 inputs and a logits buffer by pointer (no copies, no per-step allocation of the past).
Only numpy and onnxruntime are imported here: a runtime-only install serves ONNX artifacts without torch.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import ManifestError, RequestError
from . import onnx_cache
from .base import MIXED_GRAPH, Backend, KVCache, is_mixed_graph, physical_cores, small_page_zeros

__all__ = ["MIXED_GRAPH", "OnnxBackend", "physical_cores", "session_options"]

# The mixed-step graph (MIXED_GRAPH, inferneo_build/exporters/onnx_mixed.py) decodes the rows [0, n) and
# prefills a chunk in slot n in one forward; the chunk's KV buffers have these names.
CHUNK_PAST, CHUNK_PRESENT = "chunk_past_key_values.{}.{}", "chunk_present.{}.{}"

# The built graph is already fused; ORT's extended/layout optimizations only add load time
# (see shared/notes/FAST-DECODE.md section 6). BASIC keeps constant folding and redundant-node removal.
GRAPH_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = GRAPH_OPTIMIZATION
    opts.intra_op_num_threads = int(threads or physical_cores())  # 1 per core measured best (FAST-DECODE 6)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Threads spin between a run's nodes (fast), not after it returns: another session of this process (a draft
    # model, a second served model) would otherwise share the cores with idle spinners. Measured on SmolLM2,
    # 2 cores: int4 drafting for fp32 1.00x -> 1.49x of plain decode; plain decode unchanged.
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


class OnnxBackend(Backend):
    format = "onnx"
    multi_token_batches = False  # see _forward_impl

    def _load_impl(self) -> None:
        io = self.target.io
        if io is None or io.kv_layout != "per_layer":
            raise ManifestError(f"{self.artifact_dir}: the onnx target must declare a per_layer KV layout")
        model = self._model_path()
        files = [f"{f.path} {f.sha256}" for f in self.target.files]
        self._session, self.session_source = onnx_cache.open_session(
            model, files, lambda: session_options(self.threads), self._providers(),
            target_bytes=sum(f.size for f in self.target.files), use_cache=self.host_cache)
        declared = {i.name for i in self._session.get_inputs()}
        self._has_position_ids = "position_ids" in declared
        # graphs built before `logit_positions` existed always return every position's logits
        self.supports_last_only = "logit_positions" in declared
        layers = self.dims.num_layers
        self._kv_names = [(io.kv_input.format(l, kv), io.kv_output.format(l, kv))
                          for l in range(layers) for kv in ("key", "value")]
        self._chunk_kv_names = [(CHUNK_PAST.format(l, kv), CHUNK_PRESENT.format(l, kv))
                                for l in range(layers) for kv in ("key", "value")]
        missing = [p for p, _ in self._kv_names if p not in declared]
        if missing:
            raise ManifestError(f"{model}: graph lacks KV inputs {missing[:2]}...; declared: {sorted(declared)[:6]}...")
        self._binding = None
        self._bound_key = None
        self._mixed_session = self._mixed_binding = self._mixed_key = None
        self.mixes_steps = False
        # Step inputs that never change are made once: a row of ones (sliced for a single sequence's mask),
        # the last-position index, and 0..S-1 per prompt length.
        bounds = self.target.shapes
        self._ones = np.ones((1, bounds.max_sequence if bounds else self.dims.max_positions), dtype=np.int64)
        self._last = np.array([-1], dtype=np.int64)
        self._aranges: dict[int, np.ndarray] = {}

    def _model_path(self):
        onnx_files = [f.path for f in self.target.files if f.path.endswith(".onnx") and not is_mixed_graph(f.path)]
        if len(onnx_files) != 1:
            raise ManifestError(f"{self.artifact_dir}: expected one .onnx file in the onnx target, found {onnx_files}")
        return self.artifact_dir / onnx_files[0]

    def prepare_mixed_steps(self) -> None:
        """A second session, of the mixed-step graph, when the target has one. It holds its own pre-packed copy of
        the weights (onnxruntime's Python API cannot share them between sessions), so it loads only for engines
        that prefill in chunks."""
        self._require_loaded()
        mixed = [f.path for f in self.target.files if is_mixed_graph(f.path)]
        v = self.target.validation
        if v.status == "passed" and v.mixed_step_max_abs_error is None:
            return  # fail closed: the target's validation did not cover its mixed step
        if self._mixed_session is None and mixed:
            self._mixed_session = ort.InferenceSession(str(self.artifact_dir / mixed[0]),
                                                       sess_options=session_options(self.threads),
                                                       providers=self._providers())
            self.mixes_steps = True

    def _providers(self) -> list[str]:
        if self.device.startswith("cuda"):
            # GroupQueryAttention appends in place only when past and present are the same device buffer; this
            # backend's cache is host memory (numpy), which a CUDA session would copy in and out every step.
            raise RequestError(f"the onnx backend runs on cpu only (asked for {self.device!r}; onnxruntime "
                               f"providers here: {', '.join(ort.get_available_providers())})")
        return ["CPUExecutionProvider"]

    def _close_impl(self) -> None:
        self._session = self._binding = self._bound_key = None
        self._mixed_session = self._mixed_binding = self._mixed_key = None
        self.mixes_steps = False

    def _zeros(self, shape: tuple) -> np.ndarray:
        return small_page_zeros(shape)

    def _forward_impl(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                      last_only: bool = False) -> np.ndarray:
        n, steps = input_ids.shape
        if steps > 1 and n > 1 and past_lengths.any():
            # GroupQueryAttention takes several new tokens on a non-empty cache only for batch 1: one row at a time
            return np.concatenate([self._forward_impl(cache, start + r, input_ids[r:r + 1], past_lengths[r:r + 1],
                                                      last_only) for r in range(n)])
        binding = self._bind_cache(cache, start, n)
        mask = self._mask(past_lengths, steps)
        binding.bind_input("input_ids", "cpu", 0, np.int64, input_ids.shape, input_ids.ctypes.data)
        binding.bind_input("attention_mask", "cpu", 0, np.int64, mask.shape, mask.ctypes.data)
        if self._has_position_ids:
            positions = past_lengths[:, None] + self._arange(steps)
            binding.bind_input("position_ids", "cpu", 0, np.int64, positions.shape, positions.ctypes.data)
        rows = steps
        if self.supports_last_only:
            picked = self._last if last_only or steps == 1 else self._arange(steps)
            binding.bind_input("logit_positions", "cpu", 0, np.int64, picked.shape, picked.ctypes.data)
            rows = len(picked)
        logits = np.empty((n, rows, self.dims.vocab), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self._session.run_with_iobinding(binding)
        return logits

    def _mixed_impl(self, cache: KVCache, ids: np.ndarray, past: np.ndarray, chunk_slot: int, chunk: np.ndarray,
                    chunk_past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, c = len(ids), chunk.shape[1]
        if self._mixed_session is None or chunk_slot != n:  # the graph's chunk slot is the one after the rows
            return super()._mixed_impl(cache, ids, past, chunk_slot, chunk, chunk_past)
        binding = self._bind_mixed(cache, n)
        mask, chunk_mask = self._mask(past, 1), self._mask(chunk_past, c)
        picked = np.append(self._arange(n), n + c - 1)  # each row's token, then the chunk's last
        inputs = [("input_ids", ids), ("attention_mask", mask), ("chunk_ids", chunk),
                  ("chunk_attention_mask", chunk_mask), ("logit_positions", picked)]
        if self._has_position_ids:  # (the arrays stay referenced by `inputs` until the run: bound by pointer)
            inputs += [("position_ids", past.reshape(n, 1)), ("chunk_position_ids", chunk_past[:, None] + self._arange(c))]
        for name, value in inputs:
            binding.bind_input(name, "cpu", 0, np.int64, value.shape, value.ctypes.data)
        logits = np.empty((1, n + 1, self.dims.vocab), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self._mixed_session.run_with_iobinding(binding)
        return logits[0, :n, None], logits[:, n:]

    def _bind_mixed(self, cache: KVCache, n: int) -> ort.IOBinding:
        """The mixed graph's KV: the rows' past/present on slots [0, n), the chunk's on slot n."""
        data = cache.data
        key = (data.ctypes.data, data.shape, n)
        if key == self._mixed_key:
            return self._mixed_binding
        binding = self._mixed_session.io_binding()
        binding.bind_output("logits", "cpu")
        _bind_slots(binding, data, self._kv_names, 0, n)
        _bind_slots(binding, data, self._chunk_kv_names, n, 1)
        self._mixed_binding, self._mixed_key = binding, key
        return binding

    def _mask(self, past_lengths: np.ndarray, steps: int) -> np.ndarray:
        """attention_mask for rows with `past_lengths` filled positions and `steps` new tokens each."""
        if len(past_lengths) == 1:
            return self._ones[:, :int(past_lengths[0]) + steps]
        totals = past_lengths + steps
        return (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(np.int64)  # right padding

    def _arange(self, steps: int) -> np.ndarray:
        a = self._aranges.get(steps)
        if a is None:
            a = self._aranges[steps] = np.arange(steps, dtype=np.int64)
        return a

    def _bind_cache(self, cache: KVCache, start: int, n: int) -> ort.IOBinding:
        """Bind past and present of every layer to the cache slots [start, start+n); reused while they stay put."""
        data = cache.data
        key = (data.ctypes.data, data.shape, start, n)
        if key == self._bound_key:
            return self._binding
        binding = self._session.io_binding()
        # logits first: bind order is output order, and a logits buffer of each step's shape is rebound per call
        binding.bind_output("logits", "cpu")
        _bind_slots(binding, data, self._kv_names, start, n)
        self._binding, self._bound_key = binding, key
        return binding


def _bind_slots(binding: ort.IOBinding, data: np.ndarray, names: list[tuple[str, str]], start: int, n: int) -> None:
    """Bind each layer's (past, present) pair in `names` to the same memory: cache slots [start, start+n)."""
    for idx, (past, present) in enumerate(names):
        view = data[idx // 2, idx % 2, start:start + n]
        assert view.flags.c_contiguous and view.shape[0] == n  # the slots lie inside the cache
        binding.bind_input(past, "cpu", 0, np.float32, view.shape, view.ctypes.data)
        binding.bind_output(present, "cpu", 0, np.float32, view.shape, view.ctypes.data)
