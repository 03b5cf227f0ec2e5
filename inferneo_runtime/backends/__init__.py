"""Backends, registered by target format. Each factory imports its backend only when asked for."""
from .base import Backend, KVCache, backend_class, register_backend


@register_backend("onnx")
def _onnx():
    from .onnx import OnnxBackend
    return OnnxBackend


@register_backend("torchscript")
def _torchscript():
    from .torchscript import TorchScriptBackend
    return TorchScriptBackend


@register_backend("pt2")
def _pt2():
    from .pt2 import Pt2Backend
    return Pt2Backend


@register_backend("tensorrt")
def _tensorrt():
    from .tensorrt import TensorRTBackend
    return TensorRTBackend


__all__ = ["Backend", "KVCache", "backend_class", "register_backend"]
