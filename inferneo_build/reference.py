"""The PyTorch reference (HF transformers) as a runtime backend, so validation runs it through the same
generation loop as every target. One sequence per forward call: validation feeds prompts one at a time."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import torch

from inferneo_runtime.backends.base import Backend
from inferneo_runtime.manifest import ModelDims, ShapeBounds


class _PerSlotCache:
    """Duck-types KVCache for the generation loop: one transformers cache object per slot."""

    def __init__(self, batch: int, capacity: int):
        self.slots = [None] * batch
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return len(self.slots)

    nbytes = 0

    def ensure(self, slots: int, positions: int, keep=None) -> None:
        self.slots += [None] * (slots - len(self.slots))
        self.capacity = max(self.capacity, positions)

    def ensure_capacity(self, needed: int) -> None:
        self.ensure(self.batch, needed)

    def copy_slot(self, src: int, dst: int, length=None) -> None:
        self.slots[dst] = self.slots[src]


class TorchReference(Backend):
    format = "pytorch"

    def __init__(self, model: torch.nn.Module, dims: ModelDims, shapes: ShapeBounds):
        super().__init__(artifact_dir=".", target=SimpleNamespace(shapes=shapes, io=None), dims=dims)
        self.model = model
        # transformers 5.2x renamed `past_key_values` (input and output) to `cache`; 4.57 has only the old name
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _load_impl(self) -> None:
        self.model.eval()

    def _close_impl(self) -> None:
        pass

    def _zeros(self, shape):  # pragma: no cover - this backend keeps its own cache objects
        raise NotImplementedError

    def allocate_cache(self, batch: int, capacity: int) -> _PerSlotCache:
        return _PerSlotCache(batch, capacity)

    def _forward_impl(self, cache, start, input_ids, past_lengths) -> np.ndarray:
        if input_ids.shape[0] != 1:
            raise ValueError("the PyTorch reference runs one sequence per call")
        past = cache.slots[start] if past_lengths[0] > 0 else None
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(input_ids), **{self._cache_arg: past}, use_cache=True)
        cache.slots[start] = getattr(out, self._cache_arg)
        return out.logits.float().numpy()
