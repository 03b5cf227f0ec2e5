"""Encoder exporters (tasks feature-extraction and text-classification, see `inferneo_build.encoder`): the HF
encoder behind positional inputs in its IO's order, exported to ONNX (torch.onnx.export, then reduced to the
target's precision when it is not float32) or traced to TorchScript (weights in the target's dtype)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import ExportResult, TargetUnavailable

if TYPE_CHECKING:
    from ..encoder import EncoderSpec

_TRACE_SHAPE = (2, 7)  # batch != 1 and sequence != anything fixed, so neither is specialized away


def _pool(hidden, mask, mode: str):
    """sentence-transformers' Pooling (and `inferneo_runtime.embedding.pool`) in torch, for graphs that pool."""
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        first = torch.argmax((mask > 0).to(torch.int32), dim=1)
        return hidden[torch.arange(hidden.shape[0]), first]
    if mode == "max":
        return torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
    if mode == "lasttoken":
        seq = mask.shape[1]
        last = seq - 1 - torch.argmax((mask.flip(1) > 0).to(torch.int32), dim=1)
        return (hidden * m)[torch.arange(hidden.shape[0]), last]
    if mode == "weightedmean":
        m = m * torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    summed, count = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise ValueError(f"pooling {mode!r}")


def dense_layers(spec: EncoderSpec, dtype=None):
    """The sentence-transformers Dense modules as torch layers, weights from their folders' model.safetensors."""
    import torch
    from safetensors.torch import load_file

    acts = {"identity": torch.nn.Identity, "tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid,
            "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}
    layers = []
    for d in spec.dense:
        linear = torch.nn.Linear(d.in_features, d.out_features, bias=d.bias)
        state = load_file(str(spec.source_dir / d.path / "model.safetensors"))
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
        layers += [linear, acts[d.activation]()]
    return torch.nn.Sequential(*layers).to(dtype or torch.float32).eval()


# decoder backbones: transformers builds their masks with torch.vmap (masking_utils), which neither exporter
# traces; the wrapper passes the per-layer-type additive masks those models accept instead
_DECODER_BACKBONES = {"qwen3", "gemma3_text"}


def _decoder_masks(config, attention_mask, dtype) -> dict:
    """{"full_attention", "sliding_attention"} -> [n, 1, S, S] additive masks, as transformers' create_causal_mask /
    create_sliding_window_causal_mask (with Gemma 3's bidirectional overlays when use_bidirectional_attention)."""
    import torch

    seq = attention_mask.shape[1]
    idx = torch.arange(seq, device=attention_mask.device)
    q, k = idx.view(-1, 1), idx.view(1, -1)
    keys = (attention_mask > 0).view(-1, 1, 1, seq)
    window = getattr(config, "sliding_window", None) or seq
    if getattr(config, "use_bidirectional_attention", False):
        full, sliding = torch.ones_like(q == k), (q - k).abs() < window
    else:
        full = k <= q
        sliding = full & (q - k < window)

    def additive(visible):
        keep = keys & visible.view(1, 1, seq, seq)
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)

    return {"full_attention": additive(full), "sliding_attention": additive(sliding)}


def encoder_module(model, spec: EncoderSpec):
    import torch

    dtype = next(model.parameters()).dtype
    head = dense_layers(spec, dtype) if spec.pooled_in_graph else None

    class Encoder(torch.nn.Module):
        """Positional inputs in the IO's order; returns the one output tensor (token states, logits, or, with
        sentence-transformers Dense modules, the pooled and projected embedding)."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.head = head

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if spec.model_type in _DECODER_BACKBONES:
                kwargs["attention_mask"] = _decoder_masks(self.model.config, attention_mask, dtype)
                kwargs["use_cache"] = False
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            out = self.model(**kwargs, return_dict=False)[0]
            if self.head is not None:
                out = self.head(_pool(out, attention_mask, spec.pooling or "mean"))
            return out

    return Encoder().eval()


def _example(spec: EncoderSpec):
    import torch

    n, s = _TRACE_SHAPE
    ids = (torch.arange(n * s).view(n, s) % 1000) + 100
    mask = torch.ones_like(ids)
    mask[1, s - 2:] = 0  # a padded row, so the mask path is traced
    inputs = [ids, mask] + ([torch.zeros_like(ids)] if spec.token_type_ids else [])
    return tuple(inputs)


def export_encoder_onnx(model, spec: EncoderSpec, target, out_dir: Path) -> ExportResult:
    import onnx
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    names = spec.input_names + [spec.output_name]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    if spec.output == "logits" or spec.pooled_in_graph:
        axes[spec.output_name] = {0: "batch"}
    wrapper = encoder_module(model, spec)
    try:
        # The TorchScript-based exporter (deprecated in torch 2.9, still supported): the torch.export-based one
        # needs onnxscript, and a BERT encoder's graph is plain ops either way.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            torch.onnx.export(wrapper, _example(spec), str(path), input_names=spec.input_names,
                              output_names=[spec.output_name], dynamic_axes=axes, opset_version=target.opset,
                              dynamo=False, training=torch.onnx.TrainingMode.EVAL)
    finally:
        model.eval()  # the TorchScript-based exporter can leave modules in training mode (dropout on)
    onnx.checker.check_model(str(path))
    files = [path.resolve()] + [p.resolve() for p in out_dir.iterdir() if p.name != path.name and p.is_file()]
    toolchain = {"onnx": onnx.__version__, "opset": str(target.opset), "exporter": f"torch.onnx {torch.__version__}"}
    if getattr(target, "precision", "fp32") != "fp32":
        from .onnx_quant import reduce_onnx

        stage = out_dir.parent / f".{out_dir.name}.fp32"
        shutil.move(str(out_dir), str(stage))
        try:
            files, tool, dtype = reduce_onnx(stage / "model.onnx", out_dir, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return ExportResult(files=files, io=spec.io(), dtype=dtype, toolchain={**toolchain, **tool})
    return ExportResult(files=files, io=spec.io(), dtype="float32", toolchain=toolchain)


def export_encoder_torchscript(model, spec: EncoderSpec, target, out_dir: Path) -> ExportResult:
    import torch

    from inferneo_runtime.backends.torchscript import quiet_jit

    precision = getattr(target, "precision", "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt"
    source = model if dtype == torch.float32 else __import__("copy").deepcopy(model).to(dtype)
    wrapper = encoder_module(source, spec)
    example = _example(spec)
    with torch.no_grad(), quiet_jit():
        try:
            wrapper(*example)
        except RuntimeError as e:
            raise TargetUnavailable(f"torch {torch.__version__} cannot run the encoder in {precision} on this host: "
                                    f"{str(e).splitlines()[0][:200]}") from None
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return ExportResult(files=[path.resolve()], io=spec.io(), dtype=str(dtype).removeprefix("torch."),
                        toolchain={"torch": torch.__version__})
