"""The decode step with static shapes, captured once as a CUDA graph and replayed (gpt-fast's way past launch
overhead), for the torch backends (TorchScript, .pt2).

A decode step (one new token per row) for rows [start, start + n) of a cache gets the same shapes and addresses
every time when its attention mask spans the cache's whole capacity: positions past a row's length are masked
by the mask computed on the device from the row's position, so only the token ids and positions (8 bytes a
row each) cross from the host, into buffers the graph reads. A small model's step launches hundreds of kernels
whose launch costs more than their work; a replay is one launch.

A step of n rows runs as a batch bucket (1, 2, 4, then multiples of 8, as vLLM captures), so a batch that grows
one request at a time to 32 is captured 7 times, not 32: the padding rows decode a dummy token at the cache's last
position in the slots after the range, a position no slot reads before its own token writes it (a slot reads only
positions below its length, and the engine's slots past the active ones are free or part-way through prefill).
Graphs are kept per (start, bucket) and per cache tensor (its address, shape and dtype: the captured addresses are
the cache's), for the last few cache tensors used; a cache that grows is a new tensor, captured again. All of
a backend's graphs share one memory pool, which is safe because each replay's logits are read before the next
replay and the static inputs live outside it. On the CPU the same static step runs without capture (mode
"static"): how the tests check, without a GPU, that the static step computes what the per-length step does.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Callable

import numpy as np

from ..errors import InferneoError, error_summary

try:
    import torch
except ImportError:  # pragma: no cover - depends on the install
    torch = None

# (ids [n, 1], positions [n, 1], attention mask [n, capacity], cache tensor, start) -> logits [n, 1, vocab]
StepFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", int], "torch.Tensor"]

MODES = ("off", "static", "cuda")
# TorchScript's profiling executor profiles a new shape on one call and optimizes on the next (a decode step's
# shapes are new after the load's warm-up); all of that must be done before capture
WARMUP_RUNS = 3
CACHES_KEPT = 8  # cache tensors whose graphs are kept (the engine's, and draft-model caches of running requests)


def batch_bucket(n: int, room: int) -> int:
    """The rows a step of `n` runs as: 1, 2, 4, then the next multiple of 8, when that many slots follow its
    first (`room`); otherwise `n` itself."""
    bucket = n if n <= 2 else 4 if n <= 4 else -(-n // 8) * 8
    return bucket if bucket <= room else n


def default_mode(device: "torch.device") -> str:
    """"cuda" on a CUDA device unless INFERNEO_CUDA_GRAPHS is 0 / false / off / no (for comparing, or a driver
    that refuses capture)."""
    if device.type != "cuda":
        return "off"
    off = os.environ.get("INFERNEO_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "off", "no")
    return "off" if off else "cuda"


class _Graph:
    """One (start, rows) step: static input buffers, and in mode "cuda" the graph captured over one cache tensor.
    It holds no reference to the cache (a replaced cache's memory is freed); `DecodeGraphs` replays it only for
    a cache tensor at the same address, of the same shape and dtype."""

    def __init__(self, step: StepFn, capacity: int, start: int, n: int, device, pool, capture: bool):
        self.ids = torch.zeros((n, 1), dtype=torch.int64, device=device)
        self.positions = torch.zeros((n, 1), dtype=torch.int64, device=device)
        self._keys = torch.arange(capacity, device=device).unsqueeze(0)  # [1, capacity]
        self._step, self._start = step, start
        self._capture, self._pool = capture, pool
        self.graph = None
        self.logits = None

    def _run(self, cache: "torch.Tensor") -> "torch.Tensor":
        # key j is visible to the row's new token at position p iff j <= p: computed on the device
        return self._step(self.ids, self.positions, (self._keys <= self.positions).long(), cache, self._start)

    def __call__(self, cache: "torch.Tensor", ids: np.ndarray, past: np.ndarray) -> "torch.Tensor":
        self.ids.copy_(torch.from_numpy(ids))
        self.positions.copy_(torch.from_numpy(past).view(-1, 1))
        if not self._capture:
            return self._run(cache)
        if self.graph is None:
            self._record(cache)
        self.graph.replay()
        return self.logits

    def _record(self, cache: "torch.Tensor") -> None:
        # The warm-up runs are this step itself (the same inputs write the same keys and values), so nothing in
        # the cache is disturbed; they run on a side stream, as torch's capture requires.
        current = torch.cuda.current_stream(cache.device)
        side = torch.cuda.Stream(cache.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._run(cache)
        finally:
            current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a second model's engine) does not invalidate this capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.logits = self._run(cache)
        self.graph = graph


class DecodeGraphs:
    """A backend's static decode steps: `run(...)` gives the step's logits on the device, or None when the step
    is not a static decode (several tokens per row, or the mode is "off") and the backend runs it as usual.

    A capture that fails turns the mode "off" for the backend's life, with the reason in `error` and one warning:
    decoding goes on uncaptured rather than failing a request."""

    def __init__(self, step: StepFn, mode: str):
        if mode not in MODES:
            raise InferneoError(f"decode graph mode {mode!r}; one of {', '.join(MODES)}")
        self._step = step
        self.mode = mode
        self.error: str | None = None
        self.built = 0  # steps set up (static buffers; in mode "cuda" captured too), over the backend's life
        self.captured = 0  # CUDA graphs recorded over the backend's life (a cache that grows records again)
        # per cache tensor (address, shape, dtype), the most recently used last: its graphs per (start, rows)
        self._graphs: OrderedDict[tuple, dict[tuple[int, int], _Graph]] = OrderedDict()
        self._pool = None

    def run(self, cache, start: int, ids: np.ndarray, past: np.ndarray) -> "torch.Tensor | None":
        if self.mode == "off" or ids.shape[1] != 1:
            return None
        # A graph replays the addresses it was captured with: valid for whatever cache tensor now has that
        # address, shape and dtype (an engine's next cache of the same size usually gets the same memory back),
        # and for nothing else (a cache that grew, or another one). Several caches take turns on one backend
        # (each request's draft-model cache), so the last few keep their graphs.
        data = cache.data
        key = (data.data_ptr(), tuple(data.shape), data.dtype)
        graphs = self._graphs.get(key)
        if graphs is None:
            graphs = self._graphs[key] = {}
            while len(self._graphs) > CACHES_KEPT:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        n = ids.shape[0]
        rows = batch_bucket(n, cache.batch - start)
        if rows > n:  # padding rows: a dummy token at the last position of the slots after the range
            ids = np.concatenate([ids, np.zeros((rows - n, 1), dtype=np.int64)])
            past = np.concatenate([past, np.full(rows - n, cache.capacity - 1, dtype=np.int64)])
        graph = graphs.get((start, rows))
        if graph is None:
            capture = self.mode == "cuda"
            if capture and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _Graph(self._step, cache.capacity, start, rows, cache.data.device, self._pool, capture)
        try:
            logits = graph(cache.data, ids, past)
        except Exception as e:  # the driver or an op refused capture: decode on, uncaptured
            if self.mode != "cuda":
                raise
            self._disable(e)
            return None
        if (start, rows) not in graphs:
            graphs[(start, rows)] = graph
            self.built += 1
            self.captured += graph.graph is not None
        return logits[:n]

    def _disable(self, error: Exception) -> None:
        self.mode = "off"
        self._graphs.clear()
        self.error = error_summary(error)
        warnings.warn(f"CUDA graph capture of the decode step failed ({self.error}); decoding without it",
                      RuntimeWarning, stacklevel=3)
