"""Exporters: one module per target format, each a function registered under its format name.

An exporter takes the normalized decoder (`DecoderSpec` + canonical numpy weights), the recipe's target
entry and shape bounds, and writes its files into `out_dir`, the target's own folder in the artifact
(`<artifact>/<target name>/`; backends find their files through the manifest's file list). It returns what the manifest
needs to describe those files. Exporters never validate; `inferneo_build.validate` does that through the
runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from inferneo_runtime.manifest import IOSignature

from ..architectures import DecoderSpec


class TargetUnavailable(RuntimeError):
    """The toolchain for a target is missing on this host (e.g. TensorRT); skippable with `optional: true`."""

    exit_code = 5


@dataclass
class ExportResult:
    files: list[Path]              # absolute paths, all under out_dir
    io: IOSignature
    dtype: str = "float32"
    toolchain: dict[str, str] = field(default_factory=dict)
    compatibility: dict = field(default_factory=dict)


class Exporter(Protocol):
    def __call__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path) -> ExportResult: ...


_EXPORTERS: dict[str, Callable[[], Exporter]] = {}


def register_exporter(fmt: str):
    """Register a zero-argument factory returning the export function (keeps heavy imports lazy)."""

    def deco(factory):
        if fmt in _EXPORTERS:
            raise ValueError(f"exporter {fmt!r} registered twice")
        _EXPORTERS[fmt] = factory
        return factory

    return deco


def exporter_for(fmt: str) -> Exporter:
    try:
        return _EXPORTERS[fmt]()
    except KeyError:
        raise ValueError(f"no exporter for format {fmt!r}; known: {', '.join(sorted(_EXPORTERS))}") from None


@register_exporter("onnx")
def _onnx():
    from .onnx import export_onnx
    return export_onnx


@register_exporter("torchscript")
def _torchscript():
    from .torchscript import export_torchscript
    return export_torchscript


@register_exporter("pt2")
def _pt2():
    from .pt2 import export_pt2
    return export_pt2


@register_exporter("tensorrt")
def _tensorrt():
    from .tensorrt import export_tensorrt
    return export_tensorrt
