""".pt2 backend: runs an AOTInductor package (`pt2/model.pt2`) over the runtime's stacked torch KV cache.

The compiled graph assumes its inputs are contiguous, so it is given the whole cache [layers, 2, slots, kv_heads,
capacity, head_dim] and the first slot of the call as the length of `slot_offset` (see
`inferneo_build.exporters.pt2`). It only reads the cache and returns the step's keys/values; this backend writes
them into the call's slots at the step's positions.
"""
from __future__ import annotations

from ..errors import InferneoError, ManifestError, error_summary
from .base import physical_cores
from .decode_graph import DecodeGraphs, default_mode
from .torchscript import TorchScriptBackend, _torch_device, torch

SLOT_OFFSET_BIAS = 2  # slot_offset has first_slot + 2 elements (export treats sizes 0 and 1 as constants)


class Pt2Backend(TorchScriptBackend):
    format = "pt2"
    supports_last_only = True

    def _load_impl(self) -> None:
        io = self.target.io
        if io is None or io.kv_layout != "stacked" or [t.name for t in io.inputs][-1:] != ["slot_offset"]:
            raise ManifestError(f".pt2 target declares kv_layout {getattr(io, 'kv_layout', None)!r} without a "
                                "slot_offset input: it was built by an earlier Inferneo (its graph wrote the KV cache "
                                "itself, copying it on every step); rebuild it with `inferneo build --force` (its "
                                "build key is unchanged)")
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
                                f"({error_summary(e)})") from None
        self._last_position = torch.zeros(1, dtype=torch.int64, device=self._device)
        self._slot_offsets: dict[int, "torch.Tensor"] = {}
        self.decode_graphs = DecodeGraphs(self._static_step, default_mode(self._device))

    def _close_impl(self) -> None:
        self._slot_offsets = {}
        super()._close_impl()

    def _call(self, ids, positions, mask, cache, start: int, logit_positions) -> "torch.Tensor":
        if not cache.is_contiguous():  # the graph computes addresses from the sizes alone
            raise InferneoError(".pt2 backend: the KV cache is not contiguous (allocate it with backend.allocate_cache)")
        n, steps = ids.shape
        offset = self._slot_offsets.get(start)
        if offset is None:  # its length is the argument; kept, so a captured step reads the same tensor
            offset = self._slot_offsets[start] = torch.empty(start + SLOT_OFFSET_BIAS, dtype=torch.uint8,
                                                             device=self._device)
        logits, kv_new = self._module(ids, positions, mask, cache, logit_positions, offset)
        # kv_new [layers, 2, n, kv_heads, S, head_dim] goes to the rows' positions
        index = positions.view(1, 1, n, 1, steps, 1).expand(kv_new.shape)
        cache[:, :, start:start + n].scatter_(4, index, kv_new)
        return logits
