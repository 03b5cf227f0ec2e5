"""TorchScript target: the project's decoder (`exporters.torch_decoder.Decoder`), traced once and saved as one
`model.pt`, with the runtime's stacked-cache signature (the cache written in place; see `torch_decoder`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inferneo_runtime.backends.torchscript import quiet_jit
from inferneo_runtime.manifest import IOSignature, TensorSpec

from ..architectures import DecoderSpec
from . import ExportResult
from .torch_decoder import Decoder, example_inputs, table_length, token_inputs

FILE_NAME = "model.pt"


def io_signature(spec: DecoderSpec, cache_dtype: str = "float32") -> IOSignature:
    """`cache_dtype` is the KV cache's element type; the runtime allocates the cache in it."""
    cache_shape = [spec.num_layers, 2, "batch", spec.kv_heads, "capacity", spec.head_dim]
    cache = TensorSpec(name="kv_cache", dtype=cache_dtype, shape=cache_shape)
    return IOSignature(
        inputs=[*token_inputs(), cache, TensorSpec(name="logit_positions", dtype="int64", shape=["logit_positions"])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "logit_positions", spec.vocab]), cache],
        kv_layout="stacked",
    )


def export_torchscript(spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path) -> ExportResult:
    """Build the decoder from canonical weights, trace it and save `out_dir/model.pt` (out_dir is the target's own folder)."""
    rope_length = table_length(spec, shapes.max_sequence)
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad(), quiet_jit():
        model = Decoder(spec, weights, rope_length).eval()
        traced = torch.jit.trace(model, example_inputs(spec), check_trace=False)
        torch.jit.save(traced, str(path))
    return ExportResult(files=[path.resolve()], io=io_signature(spec), dtype="float32",
                        toolchain={"torch": torch.__version__})
