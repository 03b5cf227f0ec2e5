"""The backend interface every target implements, and the KV cache the runtime owns.

A backend runs one decoder step over new tokens with a cache:

    cache = backend.allocate_cache(batch=4, capacity=256)
    logits = backend.forward(cache, start=0, input_ids=ids[n, S], past_lengths=lens[n])

`forward` works on the contiguous slot range [start, start + n) of the cache. Row r's new tokens sit at
positions past_lengths[r] .. past_lengths[r] + S - 1 and attend to everything before them in that slot.
The backend writes their keys/values into the cache in place and returns float32 logits [n, S, vocab],
or [n, 1, vocab] for the last position only with `last_only=True` (what sampling needs; a prefill then
skips the vocabulary-sized projection of every other prompt position when the backend supports it).
Prefill and decode are the same call with different S; the generation loop keeps active slots contiguous.
`forward_tokens` is the same step returning each row's next token instead of the logits, greedy or drawn as the
sampler would (the loop's decode steps whose logits nothing else reads; on a GPU only the tokens cross to the host).
"""
from __future__ import annotations

import json
import mmap
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from ..errors import ManifestError, RequestError
from ..sampling import GREEDY, draw_tokens

if TYPE_CHECKING:  # annotations only
    from ..manifest import ModelDims, TargetEntry
    from ..sampling import SamplingParams

CAPACITY_CHUNK = 256  # the cache grows in steps of this many positions


# An onnx target's mixed-step graph (a prompt chunk in the decode step's forward), beside its model.onnx
MIXED_GRAPH = "model.mixed.onnx"


def is_mixed_graph(path: str) -> bool:
    """Whether a manifest file path (forward slashes) is a target's mixed-step graph."""
    return path.rsplit("/", 1)[-1] == MIXED_GRAPH


def rounded_capacity(positions: int, max_capacity: int) -> int:
    """Cache positions to allocate for `positions`: a multiple of CAPACITY_CHUNK, at most `max_capacity`."""
    return min(max_capacity, -(-max(positions, 1) // CAPACITY_CHUNK) * CAPACITY_CHUNK)


def small_page_zeros(shape: tuple, dtype=np.float32) -> np.ndarray:
    """A zeroed array in anonymous memory of 4 KiB pages, for a KV cache on the CPU. numpy asks the kernel for
    2 MiB pages on large arrays, and a cache is written scattered (a run of positions per slot, head and layer),
    so where the kernel grants them, the first writes zero (and make resident) nearly the whole array; with
    small pages, only where positions are written. Growing 2 streams' cache to 2,048 positions as a long prompt
    joined took 35 ms with numpy's pages and 4 ms this way (copying only the positions in use); decode steps
    run the same."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < 1 << 20 or not hasattr(mmap, "MAP_PRIVATE"):  # (small, or Windows: numpy's allocation)
        return np.zeros(shape, dtype=dtype)
    try:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    except OSError as e:  # ENOMEM: the same error numpy's allocation gives, which callers report
        raise MemoryError(f"cannot map {nbytes} bytes: {e.strerror}") from e
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


class KVCache:
    """All layers' keys and values in one array [layers, 2, batch, kv_heads, capacity, head_dim].

    Slot b of every layer is contiguous, so a backend can bind `data[l, kv, start:start+n]` in place.
    Works for numpy arrays and torch tensors alike (the backend supplies `zeros`).
    """

    def __init__(self, zeros: Callable[[tuple], Any], layers: int, kv_heads: int, head_dim: int,
                 batch: int, capacity: int, max_capacity: int):
        self._zeros = zeros
        self.max_capacity = max_capacity
        self.shape_tail = (kv_heads, head_dim)
        self.data = zeros((layers, 2, batch, kv_heads, capacity, head_dim))
        self.version = 0  # bumped whenever `data` is replaced, so backends can drop stale bindings

    @property
    def batch(self) -> int:
        return self.data.shape[2]

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    def ensure(self, slots: int, positions: int, keep: int | None = None) -> None:
        """Grow to at least `slots` slots with room for `positions` positions, copying what is there, in one
        reallocation: a request that joins a running batch with a long prompt pays one copy, not two. `keep`:
        copy only each slot's first `keep` positions (the longest sequence the slots hold; the rest is never
        read). The copy is scattered, a run per slot, head and layer, and first touch of fresh memory is what it
        costs: 14 ms for 256 positions of two slots into a 2,048-position cache, against 4 ms for the 70 in use
        (in 4 KiB pages; see small_page_zeros for what numpy's huge pages add)."""
        if slots <= self.batch and positions <= self.capacity:
            return
        if positions > self.max_capacity:
            raise RequestError(f"sequence of {positions} tokens exceeds the artifact's max_sequence {self.max_capacity}")
        old = self.data
        layers, two, batch, heads, cap, dim = old.shape
        new_cap = cap if positions <= cap else rounded_capacity(positions, self.max_capacity)
        kept = cap if keep is None else min(cap, keep)
        self.data = self._zeros((layers, two, max(slots, batch), heads, new_cap, dim))
        self.data[:, :, :batch, :, :kept] = old[:, :, :, :, :kept]
        self.version += 1

    def ensure_capacity(self, needed: int) -> None:
        """Room for `needed` positions; grows in steps of CAPACITY_CHUNK so a growing sequence rarely regrows."""
        self.ensure(self.batch, needed)

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Move slot `src`'s first `length` positions (all when None) into slot `dst`."""
        if src != dst:
            n = self.capacity if length is None else length
            self.data[:, :, dst, :, :n] = self.data[:, :, src, :, :n]

    @property
    def nbytes(self) -> int:
        d = self.data
        return int(d.nbytes) if hasattr(d, "nbytes") else int(d.element_size() * d.nelement())


class Backend(ABC):
    """Template methods: public `load/forward/close` check state and inputs; subclasses write `_impl`s."""

    format: str = ""
    # True when `_forward_impl` takes `last_only=True` and computes only the last position's logits;
    # otherwise `forward` slices them from the full result.
    supports_last_only: bool = False
    # Where the loaded model came from when the backend can load it more than one way (onnx: "cache", this
    # host's packed copy; "created", the artifact while writing that copy; "artifact"); None otherwise.
    session_source: str | None = None
    # False when `_forward_impl` runs several new tokens per row on a non-empty cache one row at a time (onnx's
    # GroupQueryAttention): the loop then verifies speculative drafts only while a single request runs.
    multi_token_batches: bool = True
    # True when `forward_mixed` runs a decode step and a prompt chunk as one forward (onnx with its mixed-step
    # graph, after `prepare_mixed_steps`); otherwise it runs them as two and the engine keeps them apart.
    mixes_steps: bool = False

    def __init__(self, artifact_dir: Path, target: "TargetEntry", dims: "ModelDims", device: str = "cpu",
                 threads: int | None = None, host_cache: bool = True):
        self.artifact_dir = Path(artifact_dir)
        self.target = target
        self.dims = dims
        self.device = device
        self.threads = threads
        # may the backend keep a load-ready copy for this host in the local cache (onnx: its packed weights)?
        # The builder says no: it loads from a staging directory on a machine that is rarely the deploy host.
        self.host_cache = host_cache
        self._loaded = False

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> "Backend":
        if not self._loaded:
            try:
                self._load_impl()
            except BaseException:
                self._close_impl()  # what a load that failed half-way made (weights, sessions) goes now, not at gc
                raise
            self._loaded = True
        return self

    def close(self) -> None:
        if self._loaded:
            self._close_impl()
            self._loaded = False

    def __enter__(self) -> "Backend":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rope_switch(self) -> int | None:
        """LongRoPE's switch (None for every other model): a forward call whose sequence (past + new tokens) is
        longer than this rotates all its tokens with the long factors, as the build's graphs do (transformers'
        forward; inferneo_build.architectures.Rope). The engine keeps speculation, prefill chunks and cached
        prefixes from changing which tokens a call rotates how. Read from the artifact's config.json."""
        if not hasattr(self, "_rope_switch"):
            self._rope_switch = None
            try:
                config = json.loads((self.artifact_dir / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            for rope in (config.get("rope_scaling"), config.get("rope_parameters")):
                if isinstance(rope, dict) and "longrope" in (rope.get("rope_type"), rope.get("type")):
                    switch = config.get("original_max_position_embeddings") or config.get("max_position_embeddings")
                    self._rope_switch = int(switch) if switch else None
        return self._rope_switch

    def model_file(self, suffix: str) -> Path:
        """The target's file ending in `suffix`, as the manifest lists it (targets live in their own folder)."""
        for f in self.target.files:
            if f.path.endswith(suffix):
                return self.artifact_dir / f.path
        raise ManifestError(f"target {self.target.format!r} lists no *{suffix} file in the manifest")

    # -- inference --------------------------------------------------------------------------------
    def input_metadata(self) -> dict[str, tuple[str, tuple]]:
        """name -> (dtype, shape) as the manifest declares it; strings are symbolic dims."""
        io = self.target.io
        return {t.name: (t.dtype, tuple(t.shape)) for t in io.inputs} if io else {}

    def allocate_cache(self, batch: int, capacity: int) -> KVCache:
        self._require_loaded()
        bounds = self.target.shapes
        if bounds and batch > bounds.max_batch:
            raise RequestError(f"batch of {batch} exceeds the artifact's max_batch {bounds.max_batch}")
        max_capacity = bounds.max_sequence if bounds else self.dims.max_positions
        capacity = rounded_capacity(capacity, max_capacity)
        return KVCache(self._zeros, self.dims.num_layers, self.dims.kv_heads, self.dims.head_dim,
                       batch, capacity, max_capacity)

    def forward(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                last_only: bool = False) -> np.ndarray:
        ids, past = self._checked(cache, start, input_ids, past_lengths)
        return self._logits(cache, start, ids, past, last_only)

    def forward_tokens(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                       params: Optional[Sequence["SamplingParams"]] = None,
                       uniforms: Optional[np.ndarray] = None) -> np.ndarray:
        """The same step as `forward`, returning each row's next token after its last new token ([n] int64)
        instead of the logits: all a step needs whose logits nothing else reads (no logprobs, penalty, bias, ban
        or grammar). Row r is greedy (its argmax, the first of equal maxima) or drawn from `params[r]`'s
        temperature, top-k, top-p and min-p at the uniform `uniforms[r]`, as `sampling.choose_token` draws with
        a generator that gives it; `params=None`: every row greedy. Backends whose logits live on a GPU override
        `_tokens_impl`, so that only the tokens cross to the host."""
        ids, past = self._checked(cache, start, input_ids, past_lengths)
        if params is None:
            params, uniforms = [GREEDY] * len(ids), np.zeros(len(ids))
        return self._tokens_impl(cache, start, ids, past, params, uniforms)

    def prepare_mixed_steps(self) -> None:
        """Load what a one-forward `forward_mixed` needs, if the target has it (an engine with a prefill budget
        calls this once, so that the loading does not land inside a step); `mixes_steps` says whether it did."""

    def forward_mixed(self, cache: KVCache, input_ids: np.ndarray, past_lengths: np.ndarray, chunk_slot: int,
                      chunk_ids: np.ndarray, chunk_past: int) -> tuple[np.ndarray, np.ndarray]:
        """One decode step of the rows [0, n) (`input_ids` [n, 1]) and a prompt chunk (`chunk_ids` [1, c]) in
        `chunk_slot`, whose first `chunk_past` positions are filled: (the rows' logits [n, 1, vocab], the chunk's
        last position's logits [1, 1, vocab]). The results are those of the two forwards; a backend that
        `mixes_steps` runs them as one (a single pass over the weights)."""
        ids, past = self._checked(cache, 0, input_ids, past_lengths)
        if ids.shape[1] != 1 or 0 <= chunk_slot < len(ids):
            raise RequestError(f"a mixed step takes one token per row and a chunk outside the rows' slots "
                               f"(got {ids.shape[1]} tokens per row, chunk slot {chunk_slot} of rows [0, {len(ids)}))")
        chunk, chunk_past_lengths = self._checked(cache, chunk_slot, chunk_ids, np.array([chunk_past], dtype=np.int64))
        return self._mixed_impl(cache, ids, past, chunk_slot, chunk, chunk_past_lengths)

    def _checked(self, cache: KVCache, start: int, input_ids: np.ndarray,
                 past_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._require_loaded()
        n, steps = input_ids.shape
        if start < 0 or start + n > cache.batch:
            raise RequestError(f"slots [{start}, {start + n}) outside a cache of {cache.batch} slots")
        cache.ensure_capacity(int(past_lengths.max()) + steps)
        return np.ascontiguousarray(input_ids, dtype=np.int64), np.ascontiguousarray(past_lengths, dtype=np.int64)

    def _logits(self, cache: KVCache, start: int, ids: np.ndarray, past: np.ndarray, last_only: bool) -> np.ndarray:
        if last_only and self.supports_last_only:
            return self._forward_impl(cache, start, ids, past, last_only=True)
        logits = self._forward_impl(cache, start, ids, past)
        return logits[:, -1:] if last_only else logits

    def _tokens_impl(self, cache: KVCache, start: int, ids: np.ndarray, past: np.ndarray,
                     params: Sequence["SamplingParams"], uniforms: np.ndarray) -> np.ndarray:
        return draw_tokens(self._logits(cache, start, ids, past, last_only=True)[:, -1], params, uniforms)

    def _mixed_impl(self, cache: KVCache, ids: np.ndarray, past: np.ndarray, chunk_slot: int, chunk: np.ndarray,
                    chunk_past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunk_logits = self._logits(cache, chunk_slot, chunk, chunk_past, last_only=True)
        return self._logits(cache, 0, ids, past, last_only=False), chunk_logits

    # -- subclass hooks ---------------------------------------------------------------------------
    @abstractmethod
    def _load_impl(self) -> None: ...

    @abstractmethod
    def _close_impl(self) -> None: ...

    @abstractmethod
    def _zeros(self, shape: tuple) -> Any:
        """A zero-filled float array of `shape` on this backend's device (numpy or torch)."""

    @abstractmethod
    def _forward_impl(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray) -> np.ndarray:
        """Logits [n, S, vocab]; backends with `supports_last_only` also take `last_only=True` -> [n, 1, vocab]."""

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeError(f"{type(self).__name__} used before load()")


def physical_cores() -> int:
    """Cores (not hyperthreads) this process may run on: the default intra-op thread count of every backend."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, package = set(), None, "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    package = value
                elif key == "core id" and cpu in allowed:
                    cores.add((package, value))
    except OSError:
        pass
    return len(cores) or len(allowed)


# -- registry ---------------------------------------------------------------------------------------
_BACKENDS: dict[str, Callable[[], type[Backend]]] = {}


def register_backend(fmt: str):
    """Register a zero-argument factory returning the backend class (so heavy imports stay lazy)."""

    def deco(factory):
        if fmt in _BACKENDS:
            raise ValueError(f"backend {fmt!r} registered twice")
        _BACKENDS[fmt] = factory
        return factory

    return deco


def backend_class(fmt: str) -> type[Backend]:
    try:
        factory = _BACKENDS[fmt]
    except KeyError:
        raise ValueError(f"no backend for format {fmt!r}; known: {', '.join(sorted(_BACKENDS))}") from None
    return factory()
