"""TensorRT engine target: built from the validated ONNX graph on a host with TensorRT and a GPU.

Without TensorRT (or without a CUDA GPU) this target cannot be built; it raises TargetUnavailable with
the reason, which a recipe can turn into a recorded skip with `optional: true`. It never writes a fake engine.
"""
from __future__ import annotations

from . import TargetUnavailable


def export_tensorrt(spec, weights, target, shapes, out_dir):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise TargetUnavailable("TensorRT is not installed on this host (pip install 'inferneo[tensorrt]' on a "
                                "machine with an NVIDIA GPU); the tensorrt target needs its builder") from None
    raise TargetUnavailable("building TensorRT engines is not implemented in this version of Inferneo")
