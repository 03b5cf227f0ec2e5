"""Recipes: the only input to a build. YAML validated by pydantic; every error names the field and line.

Relative paths in a recipe (source path/gguf, output) resolve against the current working directory,
so `inferneo build recipes/x.yaml` run from the project root writes to `artifacts/...` there.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)


class RecipeError(ValueError):
    """The recipe file is unreadable or invalid; the message names the file, field and line."""

    exit_code = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerOverrides(_Strict):
    """Corrections applied to the source's tokenizer files (GGUF conversions often get these wrong)."""

    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    add_bos_token: Optional[bool] = None
    chat_template: Optional[str] = None


ADAPTERS = Field(default_factory=list, description="PEFT LoRA adapter directories (adapter_config.json + "
                 "adapter_model.safetensors), merged into the weights in order before export")


class HubSource(_Strict):
    hf: str = Field(description="Hugging Face repo id, read from the local HF cache (offline)")
    revision: Optional[str] = None
    tokenizer: TokenizerOverrides = TokenizerOverrides()
    adapters: list[Path] = ADAPTERS


class PathSource(_Strict):
    path: Path = Field(description="local directory holding an HF checkpoint (config.json + weights); "
                                   "relative to the installed `package` when that is given")
    package: Optional[str] = Field(None, description="installed distribution that ships the checkpoint directory")
    tokenizer: TokenizerOverrides = TokenizerOverrides()
    adapters: list[Path] = ADAPTERS


class GGUFSource(_Strict):
    gguf: Path = Field(description="GGUF file; relative to the installed `package` when that is given")
    package: Optional[str] = Field(None, description="installed distribution that ships the GGUF file")
    tokenizer: TokenizerOverrides = TokenizerOverrides()
    adapters: list[Path] = ADAPTERS


class S3Source(_Strict):
    s3: str = Field(description="s3://bucket/prefix/ holding an HF checkpoint (config.json, tokenizer files, "
                                "*.safetensors); downloaded once into the cache, keyed by the objects' ETags")
    tokenizer: TokenizerOverrides = TokenizerOverrides()
    adapters: list[Path] = ADAPTERS

    @field_validator("s3")
    @classmethod
    def _s3_uri(cls, v: str) -> str:
        if not v.startswith("s3://") or not v[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"{v!r} is not an s3:// URI naming a bucket (expected s3://bucket/prefix/)")
        return v


_SOURCE_KINDS = {"hf": HubSource, "path": PathSource, "gguf": GGUFSource, "s3": S3Source}


def _source_kind(v) -> Optional[str]:
    # The one kind key picks the model, so an error names that source's fields only, not every kind's.
    if isinstance(v, dict):
        kind = next((k for k in _SOURCE_KINDS if k in v), None)
        return _SOURCE_KINDS[kind].__name__ if kind else None
    return type(v).__name__


Source = Annotated[Union[tuple(Annotated[c, Tag(c.__name__)] for c in _SOURCE_KINDS.values())],
                   Discriminator(_source_kind)]


# A target's name is its folder in the artifact: a plain name, never a path.
TARGET_NAME = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="target folder name")


class Tolerance(_Strict):
    """How close a reduced-precision target must stay to the float32 reference; unset fields take the
    precision's defaults (DEFAULT_TOLERANCES). Decoders are judged teacher-forced on the reference's greedy
    sequences, plus perplexity on a small text; encoders on the cosine similarity of their outputs."""

    top1_agreement: Optional[float] = Field(None, ge=0, le=1, description="minimum share of positions whose "
                                            "argmax equals the reference's")
    mean_kl: Optional[float] = Field(None, ge=0, description="maximum mean KL(reference || target) per position, nats")
    perplexity_delta: Optional[float] = Field(None, ge=0, description="maximum relative perplexity increase "
                                              "on the validation text (0.05 = 5%)")
    cosine: Optional[float] = Field(None, ge=-1, le=1, description="encoders: minimum cosine similarity to the reference")


# Defaults per precision, set from measurements on SmolLM2-135M over the shipped evaluation text (evaluation.py:
# prose, code, dialogue; 2,977 teacher-forced positions), with a stated margin so that a sound quantization passes
# on every CPU kernel path and a broken or over-coarse one fails. onnxruntime 1.32, on two kernel paths:
#                                                   x86_64 avx2               x86_64 avx512vnni
#   int8 weight-only affine (the default):          0.967, KL 0.0034, +0.32%  0.970, KL 0.0033, +0.15%
#   int8 weight-only rtn (accuracy_level 4):        0.967, KL 0.0047, +0.75%  0.963, KL 0.0049, +0.54%
#   int4 affine + 8-bit head (the default):         0.971, KL 0.0035, +0.03%  0.970, KL 0.0035, +0.19%
#   int4 affine, 4-bit head:                                                  0.881, KL 0.046,  +4.8%
#   int4 rtn symmetric (onnxruntime-genai's layout): 0.691, KL 0.432, +34.7%  0.687, KL 0.439, +34.5%
#   fp16: 1.000, 0.00002, +0.04% (the earlier 120-position measurement)
# Kernel paths: int8 activations are quantized inside the kernel by code chosen per instruction set (cpu_kernels.py);
# between the two paths int8's figures moved by 0.004 top-1 and 0.2 points of perplexity. The defaults' avx2
# figures come from an emulated AVX2 CPU (tools/kernel_path_check.py under qemu-user). The SmolLM2 source is a
# Q4_1 GGUF (its tied embedding Q8_0): `affine` blocks with an 8-bit head reproduce those grids exactly, so what
# is left is the kernel's int8 activations, as for int8. int8's bounds leave 2.5-3.7x its figures (KL 0.012, ppl
# +2%); int4's are the quality a usable int4 must reach on any model (top-1 0.85, KL 0.10, ppl +5%), 14-29x the
# figures here, since a source that is not already on a 4-bit grid loses more (rtn's 4-bit re-rounding fails them).
# Small models lose more to quantization than large ones; a recipe tightens these for a model that can take it.
# `cosine` applies to encoders (fp32 must match PyTorch to 0.9999).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(cosine=0.9999),
    "fp16": Tolerance(top1_agreement=0.98, mean_kl=0.005, perplexity_delta=0.01, cosine=0.999),
    "bf16": Tolerance(top1_agreement=0.93, mean_kl=0.03, perplexity_delta=0.03, cosine=0.995),
    "int8": Tolerance(top1_agreement=0.93, mean_kl=0.012, perplexity_delta=0.02, cosine=0.99),
    "int4": Tolerance(top1_agreement=0.85, mean_kl=0.10, perplexity_delta=0.05, cosine=0.98),
}


EXCLUDE = Field(default_factory=list, description="MatMul nodes whose name contains any of these strings stay "
                "float32 (e.g. lm_head, down_proj)")


class Int4Options(_Strict):
    """Weight-only int4 (onnxruntime MatMulNBits, blocks along the input axis). The default, `affine` blocks (each
    block's own range with a float minimum: llama.cpp's Q4_1) with an 8-bit output head, is the closest to the
    float model (exact for a Q4_1/Q8_0 GGUF source) at about 0.87x the decode speed of `rtn` symmetric with a
    4-bit head, onnxruntime-genai's layout (FAST-DECODE.md). `hqq` (half-quadratic) and `mse` (a scale search)
    keep integer zero points."""

    algorithm: Literal["rtn", "hqq", "mse", "affine"] = "affine"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = Field(True, description="rtn only: symmetric blocks (no zero points) or integer zero points")
    head_bits: Literal[4, 8] = Field(8, description="the output head (lm_head): 8-bit symmetric blocks of 32, or 4 "
                                     "bits like the other MatMuls")
    accuracy_level: int = Field(4, ge=0, le=4, description="4 = int8 activations inside the MatMul (fastest on CPU); "
                                "0 = float32 activations")
    exclude: list[str] = EXCLUDE

    @model_validator(mode="after")
    def _symmetric_is_rtns(self):
        if "symmetric" in self.model_fields_set and self.algorithm != "rtn":
            raise ValueError(f"`symmetric` applies to `algorithm: rtn`; {self.algorithm} chooses its own layout")
        return self


class Int8Options(_Strict):
    """int8 weights. `weight_only` (default): MatMulNBits with 8-bit blocks of 32, activations quantized per block
    inside the kernel (accuracy_level 4) or kept float32 (0). `dynamic`: onnxruntime's quantize_dynamic,
    MatMulInteger with activations quantized per tensor on every call, which small LLMs with activation outliers
    (SmolLM2's down_proj inputs) do not survive unless those MatMuls are excluded."""

    method: Literal["weight_only", "dynamic"] = "weight_only"
    algorithm: Literal["rtn", "affine"] = Field("affine", description="weight_only only: `affine` each block's "
                                               "range with a float minimum (the output head symmetric): exact for "
                                               "a source already on a Q4_1 grid; `rtn` symmetric blocks, ~10% "
                                               "faster decode")
    accuracy_level: int = Field(4, ge=0, le=4, description="weight_only only: 4 = int8 activations per block "
                                "(onnxruntime's fast kernel); 0 = float32 activations: closer to the reference "
                                "(SmolLM2: top-1 0.983 vs 0.933) but ~20x slower on CPU, no fast kernel")
    exclude: list[str] = EXCLUDE

    @model_validator(mode="after")
    def _affine_is_weight_only(self):
        if "algorithm" in self.model_fields_set and self.method != "weight_only":
            raise ValueError(f"int8 `algorithm: {self.algorithm}` needs `method: weight_only` (dynamic quantization "
                             "has no blocks)")
        return self


class _Reduced(_Strict):
    """Fields shared by targets that can be built below float32."""

    tolerance: Optional[Tolerance] = None

    @property
    def reduced(self) -> bool:
        return self.precision != "fp32"


class OnnxTarget(_Reduced):
    format: Literal["onnx"]
    name: Optional[str] = TARGET_NAME
    opset: int = Field(17, ge=17, le=23)
    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp32"
    int4: Optional[Int4Options] = None
    int8: Optional[Int8Options] = None
    optional: bool = False

    @model_validator(mode="after")
    def _options_match_precision(self):
        for p in ("int4", "int8"):
            if getattr(self, p) is not None and self.precision != p:
                raise ValueError(f"`{p}` options need precision: {p} (this target is {self.precision})")
        return self


class TorchScriptTarget(_Reduced):
    format: Literal["torchscript"]
    name: Optional[str] = TARGET_NAME
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    optional: bool = False
    path: Literal["fused", "generic"] = Field("fused", description="generic: trace transformers' own modeling code "
                                              "even when the model_type has a fused entry (fp32; to compare them)")

    @model_validator(mode="after")
    def _generic_is_fp32(self):
        if self.path == "generic" and self.precision != "fp32":
            raise ValueError(f"path: generic exports float32 only (this target is {self.precision})")
        return self


class Pt2Target(_Reduced):
    """torch.export + AOTInductor: the decoder compiled ahead of time into a `.pt2` package for one device type
    (C++ kernels built with the host's g++ for cpu; CUDA kernels on a GPU host for cuda)."""

    format: Literal["pt2"]
    name: Optional[str] = TARGET_NAME
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: Literal["cpu", "cuda"] = Field("cpu", description="the device the package is compiled for and runs on; "
                                           "cuda needs a CUDA GPU on the build host")
    optional: bool = False


class TensorRTTarget(_Reduced):
    format: Literal["tensorrt"]
    name: Optional[str] = TARGET_NAME
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    gpu_archs: list[Annotated[str, Field(pattern=r"^\d+\.\d+$")]] = Field(
        default_factory=list, description='compute capabilities to build engines for ("8.0", "9.0"), each on a GPU '
        "of that architecture on the build host; empty: the build host's first GPU")
    optional: bool = False


Target = Annotated[Union[OnnxTarget, TorchScriptTarget, Pt2Target, TensorRTTarget], Field(discriminator="format")]


class Shapes(_Strict):
    max_batch: int = Field(4, ge=1, le=256)
    max_sequence: int = Field(2048, ge=16, le=131072)


class Validation(_Strict):
    prompts: list[str] = Field(min_length=1, description="decoders: prompts to complete; encoders: texts to embed")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    logits_atol: float = Field(1e-3, gt=0)
    perplexity_text: Optional[str] = Field(None, min_length=1, description="one text that reduced precisions are "
                                           "judged on teacher-forced (default: the shipped evaluation text)")
    evaluation_files: list[Path] = Field(default_factory=list, description="UTF-8 text files that reduced precisions "
                                         "are judged on teacher-forced (default: the shipped prose, code and dialogue, "
                                         "inferneo_build/eval_text/)")

    @model_validator(mode="after")
    def _one_evaluation_text(self):
        if self.perplexity_text and self.evaluation_files:
            raise ValueError("give perplexity_text or evaluation_files, not both")
        return self


class Encoder(_Strict):
    """Encoder tasks: how token states become one vector. `auto` reads the sentence-transformers files
    (modules.json, 1_Pooling/config.json) and falls back to mean pooling without normalization."""

    pooling: Literal["auto", "mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"] = "auto"
    normalize: Optional[bool] = None
    max_length: Optional[int] = Field(None, ge=2, description="default: sentence_bert_config.json's max_seq_length, "
                                      "else the model's max_position_embeddings")


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    source: Source
    task: Literal["text-generation", "feature-extraction", "text-classification"] = "text-generation"
    dtype: Literal["float32"] = "float32"
    targets: list[Target] = Field(min_length=1)
    shapes: Shapes = Shapes()
    validation: Validation
    encoder: Optional[Encoder] = None
    output: Optional[Path] = None
    allow_pickle: bool = Field(False, description="load pickle-based weights (*.bin, *.pt, *.pth, *.ckpt) when the "
                               "checkpoint or an adapter has no safetensors; unpickling can run arbitrary code")
    trust_remote_code: bool = Field(False, description="run the Python code a checkpoint ships (config.json "
                                    "`auto_map`); off: such checkpoints are refused")

    @field_validator("source", mode="before")
    @classmethod
    def _one_source_kind(cls, v):
        if isinstance(v, BaseModel):
            return v
        kinds = [k for k in _SOURCE_KINDS if isinstance(v, dict) and k in v]
        if len(kinds) != 1:
            raise ValueError("give a mapping with exactly one of hf, path, gguf or s3"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        return v

    @model_validator(mode="after")
    def _unique_target_names(self):
        names = [self.target_name(t) for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: duplicate target name(s) {', '.join(dupes)}; give each a distinct `name`")
        return self

    @model_validator(mode="after")
    def _task_fits(self):
        if self.is_encoder:
            bad = [self.target_name(t) for t in self.targets if t.format in ("tensorrt", "pt2")]
            if bad:
                raise ValueError(f"targets: {', '.join(bad)}: task {self.task} builds onnx and torchscript targets only")
            bad = [self.target_name(t) for t in self.targets if t.format == "onnx" and t.precision in ("fp16", "int4")]
            if bad:
                raise ValueError(f"targets: {', '.join(bad)}: task {self.task} builds onnx at fp32 or int8 only")
        else:
            if self.encoder is not None:
                raise ValueError("encoder: only for the feature-extraction and text-classification tasks")
            exact = [self.target_name(t) for t in self.targets
                     if getattr(t, "tolerance", None) is not None and t.precision == "fp32"]
            if exact:
                raise ValueError(f"targets: {', '.join(exact)}: `tolerance` applies to reduced precisions; a float32 "
                                 "decoder must reproduce the reference's greedy tokens exactly (validation.logits_atol)")
        return self

    @property
    def is_encoder(self) -> bool:
        return self.task != "text-generation"

    @property
    def output_dir(self) -> Path:
        return self.output or Path("artifacts") / self.name

    def target_name(self, target) -> str:
        """The target's folder: its `name`, else the format (`onnx`), suffixed by a reduced precision (`onnx-int4`)."""
        if target.name:
            return target.name
        precision = getattr(target, "precision", "fp32")
        if getattr(target, "path", "fused") == "generic":
            return f"{target.format}-generic"
        return target.format if precision == "fp32" or target.format == "tensorrt" else f"{target.format}-{precision}"

    def tolerance_for(self, target) -> Tolerance:
        """The target's tolerance: its own fields over the defaults of its precision."""
        precision = getattr(target, "precision", "fp32")
        base = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])
        own = getattr(target, "tolerance", None)
        return base.model_copy(update=own.model_dump(exclude_none=True)) if own else base

    def sha256(self) -> str:
        """Hash of the normalized recipe (field order and YAML formatting do not matter)."""
        # Opt-ins left off are left out, so recipes written before they existed keep their hash (and build cache).
        off = {f for f in _OPT_INS if not getattr(self, f)}
        payload = json.dumps(self.model_dump(mode="json", exclude={"output"} | off), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


_OPT_INS = ("allow_pickle", "trust_remote_code")


def _union_tags() -> set[str]:
    sources = {c.__name__ for c in _SOURCE_KINDS.values()}
    targets = {get_args(c.model_fields["format"].annotation)[0] for c in get_args(get_args(Target)[0])}
    return sources | targets


_UNION_TAGS = _union_tags()


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name, source, targets, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_describe(path, text, e)) from None
    _check_files(path, text, recipe)
    return recipe


def _describe(path: Path, text: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(text, loc)
        where = f"{path}:{line}" if line else str(path)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}" if loc else "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{where}: {field}: {msg}")
    return "invalid recipe\n  " + "\n  ".join(dict.fromkeys(lines))


def _is_union_tag(part) -> bool:
    # pydantic puts the union member tried (its class name, or the discriminator value) into `loc`
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith("function-"))


def _line_of(text: str, loc: list) -> Optional[int]:
    """1-based line of the YAML node at `loc` (or of its nearest existing parent)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _check_files(path: Path, text: str, recipe: Recipe) -> None:
    src = recipe.source
    for i, adapter in enumerate(src.adapters):
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError(f"{path}:{_line_of(text, ['source', 'adapters', i])}: source.adapters.{i}: "
                              f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    for i, f in enumerate(recipe.validation.evaluation_files):
        if not f.is_file():
            raise RecipeError(f"{path}:{_line_of(text, ['validation', 'evaluation_files', i])}: "
                              f"validation.evaluation_files.{i}: file {f} not found")
    if isinstance(src, PathSource) and src.package is None:
        if not (src.path / "config.json").is_file():
            raise RecipeError(f"{path}:{_line_of(text, ['source', 'path'])}: source.path: "
                              f"{src.path} is not an HF checkpoint directory (no config.json)")
    elif isinstance(src, GGUFSource) and src.package is None and not src.gguf.is_file():
        raise RecipeError(f"{path}:{_line_of(text, ['source', 'gguf'])}: source.gguf: file {src.gguf} not found")
