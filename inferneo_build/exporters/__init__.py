"""Exporters: one module per target format, each a function registered under its task, format and precision.

An exporter takes the normalized decoder (`DecoderSpec` + canonical numpy weights), the recipe's target
entry and shape bounds, and writes its files into `out_dir`, the target's own folder in the artifact
(`<artifact>/<target name>/`; backends find their files through the manifest's file list). It returns what the manifest
needs to describe those files. Exporters never validate; `inferneo_build.validate` does that through the
runtime.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from inferneo_runtime.manifest import IOSignature

from ..architectures import DecoderSpec


class TargetUnavailable(RuntimeError):
    """The toolchain for a target is missing on this host (e.g. TensorRT); skippable with `optional: true`."""

    exit_code = 5


class TargetUnsupported(TargetUnavailable):
    """The model cannot take this target's format (e.g. a head_dim onnxruntime's attention kernel refuses): bad
    input for the recipe (exit 2), or, with `optional: true`, a target skipped with the reason."""

    exit_code = 2


@dataclass
class ExportResult:
    files: list[Path]              # absolute paths, all under out_dir
    io: IOSignature
    dtype: str = "float32"
    toolchain: dict[str, str] = field(default_factory=dict)
    compatibility: dict = field(default_factory=dict)


class Exporter(Protocol):
    def __call__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path) -> ExportResult: ...


# One registry: (task, format, precision) -> a zero-argument factory returning the export function (keeps heavy
# imports lazy). task: "decoder" (DecoderSpec + canonical weights; the generic path's exporter lives with it, in
# inferneo_build.generic) or "encoder" (the HF encoder and its EncoderSpec: model, spec, target, out_dir).
# precision: "fp32", "reduced" (any other precision) or "any" (an exporter that handles every precision itself).
ExporterKey = tuple[str, str, str]
EXPORTERS: dict[ExporterKey, Callable[[], Callable]] = {}


def register_exporter(fmt: str, *, task: str = "decoder", precision: str = "fp32"):
    """Register a zero-argument factory returning the export function of `task` to `fmt` in `precision`."""

    def deco(factory):
        key = (task, fmt, precision)
        if key in EXPORTERS:
            raise ValueError(f"exporter {key!r} registered twice")
        EXPORTERS[key] = factory
        return factory

    return deco


def _factory(fmt: str, precision: str, task: str) -> Callable[[], Callable]:
    for key in ((task, fmt, "fp32" if precision == "fp32" else "reduced"), (task, fmt, "any")):
        if key in EXPORTERS:
            return EXPORTERS[key]
    known = sorted({f for t, f, _ in EXPORTERS if t == task})
    raise ValueError(f"no exporter for format {fmt!r}; known: {', '.join(known)}")


def exporter_for(fmt: str, precision: str = "fp32", task: str = "decoder") -> Exporter:
    """The export function of `task` to `fmt` in `precision` (ValueError for a format the task has none for)."""
    return _factory(fmt, precision, task)()


class _DecoderByFormat(MutableMapping):
    """`_EXPORTERS[fmt]`: the registry's float32 decoder factories by format alone, read and written through."""

    def __getitem__(self, fmt: str):
        try:
            return _factory(fmt, "fp32", "decoder")
        except ValueError:
            raise KeyError(fmt) from None

    def __setitem__(self, fmt: str, factory) -> None:
        EXPORTERS[("decoder", fmt, "fp32")] = factory

    def __delitem__(self, fmt: str) -> None:
        del EXPORTERS[("decoder", fmt, "fp32")]

    def __iter__(self):
        return iter(sorted({f for t, f, _ in EXPORTERS if t == "decoder"}))

    def __len__(self) -> int:
        return len(list(iter(self)))


_EXPORTERS = _DecoderByFormat()


@register_exporter("onnx")
def _onnx():
    from .onnx import export_onnx
    return export_onnx


@register_exporter("onnx", precision="reduced")
def _onnx_reduced():
    from .onnx_quant import export_onnx_reduced
    return export_onnx_reduced


@register_exporter("torchscript")
def _torchscript():
    from .torchscript import export_torchscript
    return export_torchscript


@register_exporter("torchscript", precision="reduced")
def _torchscript_reduced():
    from .torchscript_reduced import export_torchscript_reduced
    return export_torchscript_reduced


@register_exporter("pt2", precision="any")
def _pt2():
    from .pt2 import export_pt2
    return export_pt2


@register_exporter("tensorrt", precision="any")
def _tensorrt():
    from .tensorrt import export_tensorrt
    return export_tensorrt


@register_exporter("onnx", task="encoder", precision="any")
def _encoder_onnx():
    from .encoder import export_encoder_onnx
    return export_encoder_onnx


@register_exporter("torchscript", task="encoder", precision="any")
def _encoder_torchscript():
    from .encoder import export_encoder_torchscript
    return export_encoder_torchscript
