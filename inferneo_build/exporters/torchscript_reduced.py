"""Reduced-precision TorchScript targets (`precision: bf16 | fp16`): the project's traced decoder
(`exporters.torch_decoder.Decoder`) with its weights and compute in the lower dtype, behind the same signature.

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
from .torch_decoder import Decoder, example_inputs, table_length
from .torchscript import FILE_NAME, io_signature

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ReducedDecoder(nn.Module):
    """The decoder with weights, compute and KV cache in `dtype`; logits come back float32."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.decoder = decoder.to(dtype)

    def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions):
        logits, kv_cache = self.decoder(input_ids, position_ids, attention_mask, kv_cache, logit_positions)
        return logits.float(), kv_cache


def export_torchscript_reduced(spec, weights, target, shapes, out_dir: Path) -> ExportResult:
    dtype = DTYPES[target.precision]
    rope_length = table_length(spec, shapes.max_sequence)
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_inputs(spec, cache_dtype=dtype)
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
