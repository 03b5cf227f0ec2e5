""".pt2 backend: runs an AOTInductor package (`pt2/model.pt2`) over a slot-major torch KV cache.

The compiled graph takes the cache as [n, layers, 2, kv_heads, capacity, head_dim] and assumes it is contiguous
(see `inferneo_build.exporters.pt2`). So the cache is allocated slot-major and handed to the runtime's
`KVCache` as a layer-major *view* ([layers, 2, batch, ...], what the generation loop indexes): slots
[start, start + n) are then one contiguous block, bound in place every step with no copy.
"""
from __future__ import annotations

import numpy as np

from ..errors import InferneoError, ManifestError
from .base import KVCache, physical_cores
from .torchscript import TorchScriptBackend, _torch_device, torch

# the slot-major layout's axes, seen layer-major (and back)
_TO_LAYER_MAJOR = (1, 2, 0, 3, 4, 5)
_TO_SLOT_MAJOR = (2, 0, 1, 3, 4, 5)


class Pt2Backend(TorchScriptBackend):
    format = "pt2"
    supports_last_only = True

    def _load_impl(self) -> None:
        io = self.target.io
        if io is None or io.kv_layout != "slot_major":
            raise ManifestError(f".pt2 target declares kv_layout {getattr(io, 'kv_layout', None)!r}; this backend runs "
                                "'slot_major'")
        self._device = _torch_device(self.device)
        built = self.target.compatibility.get("device")
        if built is not None and built != self._device.type:
            raise InferneoError(f"the .pt2 target was compiled for {built}; it cannot run on {self.device!r} "
                                f"(use device {built!r}, or build a pt2 target with device: {self._device.type})")
        declared = {t.name: t.dtype for t in io.inputs}
        self._cache_dtype = getattr(torch, declared.get("kv_cache", "float32"))
        torch.set_num_threads(int(self.threads or physical_cores()))
        path = self.model_file(".pt2")
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        index = (self._device.index or 0) if self._device.type == "cuda" else -1
        try:
            self._module = torch._inductor.aoti_load_package(str(path), device_index=index)
        except Exception as e:  # the loader raises RuntimeError / OSError from C++: name the file and the cause
            raise InferneoError(f"{path}: torch {torch.__version__} cannot load this .pt2 package "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None

    def _zeros(self, shape: tuple) -> "torch.Tensor":
        layers, two, batch, heads, capacity, dim = shape
        slot_major = super()._zeros((batch, layers, two, heads, capacity, dim))
        return slot_major.permute(*_TO_LAYER_MAJOR)

    def _forward_impl(self, cache: KVCache, start: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                      last_only: bool = False) -> np.ndarray:
        n, steps = input_ids.shape
        device = self._device
        positions = past_lengths[:, None] + np.arange(steps)
        total = past_lengths + steps
        attention_mask = (np.arange(int(total.max()))[None] < total[:, None]).astype(np.int64)
        picked = np.array([steps - 1]) if last_only else np.arange(steps)
        inputs = [torch.from_numpy(a).to(device) for a in (input_ids, positions, attention_mask)]
        slots = cache.data.permute(*_TO_SLOT_MAJOR)[start:start + n]
        if not slots.is_contiguous():  # a cache this backend did not allocate: the graph would write past it
            raise InferneoError(".pt2 backend: the KV cache is not slot-major contiguous (allocate it with "
                                "backend.allocate_cache)")
        inputs += [slots, torch.from_numpy(picked).to(device)]
        with torch.inference_mode():
            logits = self._module(*inputs)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return logits.float().cpu().numpy()

