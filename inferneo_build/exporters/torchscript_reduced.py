"""Reduced-precision TorchScript targets (`precision: bf16 | fp16`): the project's traced decoder
(`exporters.torchscript.Decoder`) with its weights and compute in the lower dtype, behind the same signature.

The KV cache is kept in the compute dtype too: the IO signature declares it (`kv_cache` bfloat16/float16) and
the runtime allocates the cache in that dtype, so a step writes its new keys/values in place with no cast of the
cached positions (half the cache memory of float32). Logits come back float32.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from inferneo_runtime.backends.torchscript import quiet_jit

from . import ExportResult, TargetUnavailable
from .torchscript import FILE_NAME, Decoder, io_signature

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TRACE_PAST, _TRACE_STEPS, _TRACE_CAPACITY = (3, 1), 3, 9  # nothing is 1 and S != T != capacity


class ReducedDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.decoder = decoder.to(dtype)
        self.dtype = dtype

    def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions):
        logits, kv_cache = self.decoder(input_ids, position_ids, attention_mask, kv_cache, logit_positions)
        return logits.float(), kv_cache


def _example_inputs(spec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    past = torch.tensor(_TRACE_PAST)
    n, steps = len(_TRACE_PAST), _TRACE_STEPS
    positions = past[:, None] + torch.arange(steps)
    total = past + steps
    mask = (torch.arange(int(total.max()))[None] < total[:, None]).long()
    ids = torch.arange(n * steps).view(n, steps) % spec.vocab
    cache = torch.zeros(spec.num_layers, 2, n, spec.kv_heads, _TRACE_CAPACITY, spec.head_dim, dtype=dtype)
    return ids, positions, mask, cache, torch.tensor([0, steps - 1])


def export_torchscript_reduced(spec, weights, target, shapes, out_dir: Path) -> ExportResult:
    dtype = DTYPES[target.precision]
    if spec.positions == "learned" and shapes.max_sequence > spec.max_positions:
        raise ValueError(f"max_sequence {shapes.max_sequence} exceeds the {spec.max_positions} learned positions "
                         f"of this {spec.model_type} checkpoint")
    rope_length = max(shapes.max_sequence, max(_TRACE_PAST) + _TRACE_STEPS)
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example_inputs(spec, dtype)
    with torch.inference_mode(False), torch.no_grad(), quiet_jit():
        model = ReducedDecoder(Decoder(spec, weights, rope_length).eval(), dtype).eval()
        try:
            model(*[t.clone() for t in example])
        except RuntimeError as e:  # e.g. a kernel without this dtype on this host's CPU build of torch
            raise TargetUnavailable(f"torch {torch.__version__} cannot run the decoder in {target.precision} on this "
                                    f"host: {str(e).splitlines()[0][:200]}") from None
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    dtype_name = str(dtype).removeprefix("torch.")
    return ExportResult(files=[path.resolve()], io=io_signature(spec, cache_dtype=dtype_name), dtype=dtype_name,
                        toolchain={"torch": torch.__version__, "compute_dtype": dtype_name, "kv_cache": dtype_name})
