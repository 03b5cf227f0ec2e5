"""Inferneo runtime: load verified artifacts and generate with a KV cache.

Slim by design: importing this package pulls in numpy, onnxruntime, tokenizers and pydantic only.
torch (TorchScript), tensorrt and boto3 are imported when a feature that needs them is used.
"""
from .artifact import Completion, Model, load
from .errors import (GoldenMismatch, InferneoError, IntegrityError, ManifestError, MissingExtraError,
                     RequestError)
from .generation import GenerationParams
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["load", "Model", "Completion", "GenerationParams", "SamplingParams", "InferneoError", "IntegrityError", "ManifestError",
           "MissingExtraError", "RequestError", "GoldenMismatch", "__version__"]
