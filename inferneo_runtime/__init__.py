"""Inferneo runtime: load verified artifacts and generate with a KV cache.

Slim by design: importing this package pulls in numpy, onnxruntime, tokenizers and pydantic only.
torch (TorchScript), tensorrt and boto3 are imported when a feature that needs them is used.
"""
from .artifact import Completion, Model, load
from .errors import (GoldenMismatch, InferneoError, IntegrityError, ManifestError, MissingExtraError,
                     RequestError)
from .generation import GenerationParams
from .manager import ModelManager
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["load", "Model", "ModelManager", "InferneoClient", "Completion", "GenerationParams", "SamplingParams",
           "InferneoError", "IntegrityError", "ManifestError", "MissingExtraError", "RequestError", "GoldenMismatch",
           "__version__"]


def __getattr__(name: str):
    if name == "InferneoClient":  # needs httpx; imported on first use so the base install stays slim
        from .client import InferneoClient

        return InferneoClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
