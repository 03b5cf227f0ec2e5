"""Inferneo build: recipe → validated ONNX / TorchScript / TensorRT artifacts (needs `inferneo[build]`)."""
from .build import BuildError, BuildResult, ValidationFailed, build
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["build", "BuildResult", "BuildError", "ValidationFailed", "Recipe", "RecipeError", "load_recipe"]
