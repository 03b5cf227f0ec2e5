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


def encoder_module(model, spec: EncoderSpec):
    import torch

    class Encoder(torch.nn.Module):
        """Positional inputs in the IO's order; returns the one output tensor."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs, return_dict=False)[0]

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
    if spec.output == "logits":
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
