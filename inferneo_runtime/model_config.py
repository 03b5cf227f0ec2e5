"""One model to serve or load (`ModelConfig`), and the names its fields accept. The registry, the model sources and
every integration take it; the server's settings (`server.config.ServerConfig`) hold a list of them."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Format = Literal["onnx", "torchscript", "pt2", "tensorrt"]
# --dtype names (vLLM's) and what a target's precision must be for each; "auto" takes any.
DTYPES = {"auto": None, "half": "fp16", "float16": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16",
          "float": "fp32", "float32": "fp32", "fp32": "fp32"}
QUANTIZATIONS = ("int8", "int4")  # what Inferneo's targets can be quantized to (ONNX)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def _check_dtype(v: Optional[str]) -> Optional[str]:
    if v is not None and v not in DTYPES:
        raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
    return v


def _check_quantization(v: Optional[str]) -> Optional[str]:
    if v is not None and v not in QUANTIZATIONS:
        raise ValueError(f"quantization {v!r} is not supported; Inferneo serves {', '.join(QUANTIZATIONS)} "
                         f"(ONNX targets built with that precision)")
    return v


# how a model's <think> reasoning is split from its answer (inferneo_runtime/reasoning.py): auto-detected, never, or
# always (vLLM's parser names for the <think> format are accepted too)
# think (or vLLM's deepseek_r1, qwen3): <think> tags (reasoning.py); harmony (vLLM's openai_gptoss): gpt-oss (harmony.py)
ReasoningParserName = Literal["auto", "none", "think", "deepseek_r1", "qwen3", "harmony", "openai_gptoss"]

# checked the same way wherever they appear (a `models:` entry, or the server-wide defaults)
DTypeName = Annotated[str, AfterValidator(_check_dtype)]
QuantizationName = Annotated[str, AfterValidator(_check_quantization)]


class ModelConfig(StrictModel):
    """One model to serve. Unset fields take the command's flags (the ServerConfig fields of the same name)."""

    path: str = Field(description="artifact directory, s3:// URI, HF checkpoint directory, hub id in the local HF "
                                  "cache, or a bare model file (model.onnx / model.pt / model.plan)")
    name: Optional[str] = Field(None, description="served name (default: the manifest's name, the checkpoint "
                                                  "directory's name or the hub id)")
    version: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
                                   description="served side by side with other versions; `name` picks the newest")
    target: Optional[str] = Field(None, description="artifact target to serve (default: chosen by format/dtype/"
                                                    "quantization, else the preferred valid one)")
    format: Optional[Format] = Field(None, description="--model-type: the target format (required for bare files)")
    tokenizer: Optional[str] = Field(None, description="bare model files: directory holding tokenizer.json "
                                                       "(default: the file's folder)")
    model_class: Optional[str] = Field(None, description="module:Class of an inferneo_runtime.models.CustomModel")
    dtype: Optional[DTypeName] = None
    quantization: Optional[QuantizationName] = None
    adapters: Optional[list[str]] = Field(None, description="LoRA adapter directories (merged at compile time)")
    reasoning_parser: Optional[ReasoningParserName] = Field(None, description="auto | none | think | harmony: "
                                                            "whether and how the server splits reasoning out of "
                                                            "the answer")


ArtifactConfig = ModelConfig  # the name this list had before it took more than artifacts
