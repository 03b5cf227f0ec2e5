"""The toolchain this host has, as Inferneo sees it: `inferneo --version`, the manifest's toolchain versions and
preflight read it here.

onnxruntime ships as several wheels that all install the same `onnxruntime` package (onnxruntime,
onnxruntime-gpu, ...); which one is installed is read from the package metadata, and what it can run on from its
execution providers at runtime, so either wheel works. Versions come from metadata, without importing torch.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
from typing import Optional

# Distributions that provide the `onnxruntime` module, most specific first.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
                             "onnxruntime-rocm", "onnxruntime-training", "onnxruntime")
# TensorRT's Python wheel is published under a CUDA-specific name too.
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")


def dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_installed(dists: tuple[str, ...]) -> tuple[Optional[str], Optional[str]]:
    for dist in dists:
        version = dist_version(dist)
        if version is not None:
            return dist, version
    return None, None


def onnxruntime_distribution() -> tuple[Optional[str], Optional[str]]:
    """(distribution, version) of the installed onnxruntime wheel, or (None, None)."""
    try:
        if importlib.util.find_spec("onnxruntime") is None:
            return None, None
    except (ImportError, ValueError):
        return None, None
    return _first_installed(ONNXRUNTIME_DISTRIBUTIONS)


def onnxruntime_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def torch_version_tuple(version: Optional[str]) -> Optional[tuple[int, int]]:
    """(major, minor) of a torch version string such as '2.13.0+cpu' or '2.15.0.dev20261201'."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def report(*, probe_providers: bool = True) -> dict:
    """Inferneo's version and the toolchain it sees (what `inferneo --version --json` prints)."""
    ort_dist, ort_version = onnxruntime_distribution()
    onnxruntime: dict = {"distribution": ort_dist, "version": ort_version}
    if ort_dist is not None and probe_providers:
        try:
            onnxruntime["providers"] = onnxruntime_providers()
        except (ImportError, OSError) as e:  # present but broken (e.g. CUDA libraries of onnxruntime-gpu missing)
            onnxruntime["error"] = str(e)
    trt_dist, trt_version = _first_installed(TENSORRT_DISTRIBUTIONS)
    return {
        "inferneo": dist_version("inferneo"),
        "python": platform.python_version(),
        "torch": dist_version("torch"),
        "transformers": dist_version("transformers"),
        "onnxruntime": onnxruntime,
        "tensorrt": trt_version if trt_dist else None,
        "onnxruntime_genai": dist_version("onnxruntime-genai") or dist_version("onnxruntime-genai-cuda"),
    }
