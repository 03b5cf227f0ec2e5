"""The artifact manifest (`inferneo.json`): the one contract between builder and runtime.

The builder writes it last; the runtime reads it first and trusts nothing it does not list.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from .errors import IntegrityError, ManifestError, pydantic_problem

SCHEMA_VERSION = 1
MANIFEST_NAME = "inferneo.json"
VALIDATION_NAME = "validation.json"
TargetFormat = Literal["onnx", "torchscript", "pt2", "tensorrt"]
Task = Literal["text-generation", "feature-extraction", "text-classification"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
# Bounds on every number that reaches arithmetic (memory estimates, cache shapes, metrics): a manifest saying
# 10**400 is refused when it is read, not a 500 for every later request that multiplies it.
Count = Annotated[int, Field(ge=0, le=1 << 24)]  # dims, heads, layers, positions, tokens
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e12, le=1e12)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields added to schema 1 after it shipped. They are left out of the JSON while unset, so a manifest that
    # does not use them is written exactly as before (and stays readable by runtimes that predate them).
    _ADDED: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler):
        data = handler(self)
        for key in self._ADDED:
            if key in data and data[key] in (None, [], {}):
                del data[key]
        return data


class FileEntry(_Model):
    path: str  # relative to the artifact root, forward slashes
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=1 << 44)  # bytes; 16 TiB

    @field_validator("path")
    @classmethod
    def _inside_artifact(cls, v: str) -> str:
        # refused before any read: a manifest must not point outside its own directory
        parts = v.split("/")
        if not v or v.startswith("/") or "\\" in v or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"file path {v!r} must be relative, forward-slashed, without '.' or '..' parts")
        return v


class TensorSpec(_Model):
    name: str
    dtype: str  # numpy-style name: float32, int64, ...
    shape: list[Union[Annotated[int, Field(ge=-1, le=1 << 24)], str]]  # ints are fixed, strings are symbolic dims


class IOSignature(_Model):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # How the KV cache is passed: "per_layer" = past_key_values.{i}.key/value (+ present.* outputs bound
    # to the same buffers); "stacked" = one [layers, 2, batch, kv_heads, capacity, head_dim] tensor;
    # "slot_major" = [batch, layers, 2, ...], only in the first .pt2 packages (still read, so that loading one
    # says "rebuild" instead of failing to parse); "none" = no cache (encoders).
    kv_layout: Literal["per_layer", "stacked", "slot_major", "none"]
    kv_input: str = "past_key_values.{}.{}"  # per-layer template: layer index, "key"|"value"
    kv_output: str = "present.{}.{}"


class ShapeBounds(_Model):
    max_batch: int = Field(ge=1, le=1 << 16)
    max_sequence: int = Field(ge=2, le=1 << 24)


class Tolerances(_Model):
    """The thresholds a target was judged by (recorded as applied, defaults filled in)."""

    top1_agreement: Optional[float] = None  # minimum share of teacher-forced positions with the reference's argmax
    mean_kl: Optional[float] = None  # maximum mean KL(reference || target), nats
    perplexity_delta: Optional[float] = None  # maximum relative perplexity increase on the validation text
    cosine: Optional[float] = None  # encoders: minimum cosine similarity to the reference


class ValidationSummary(_Model):
    _ADDED = frozenset({"criterion", "tolerance", "positions", "top1_agreement", "mean_kl", "perplexity",
                        "reference_perplexity", "perplexity_delta", "min_cosine", "evaluation_tokens",
                        "kernel_path", "mixed_step_max_abs_error"})

    status: Literal["passed", "failed", "skipped"]
    reason: Optional[str] = None
    max_abs_logits_error: Optional[float] = None
    logits_atol: Optional[float] = None
    token_match: Optional[bool] = None
    first_divergence: Optional[int] = None  # generated-token index where greedy output first differs
    prompts: int = 0
    new_tokens: int = 0
    # "exact": greedy tokens equal the reference's and logits within logits_atol (float32 decoders);
    # "tolerance": the metrics below within `tolerance` (reduced precisions, encoders)
    criterion: Optional[Literal["exact", "tolerance"]] = None
    tolerance: Optional[Tolerances] = None
    positions: Optional[int] = None  # teacher-forced positions compared (prompt + reference tokens)
    top1_agreement: Optional[float] = None
    mean_kl: Optional[float] = None
    perplexity: Optional[float] = None  # this target's, on the validation text
    reference_perplexity: Optional[float] = None
    perplexity_delta: Optional[float] = None  # (perplexity - reference) / reference
    min_cosine: Optional[float] = None  # encoders: the worst cosine similarity over the validation texts
    evaluation_tokens: Optional[int] = None  # of `positions`, those from the evaluation text (perplexity's sample)
    # the host's quantized-kernel path these figures were measured on (cpu_kernels.py), e.g. "x86_64 avx2"
    kernel_path: Optional[str] = None
    # a target that decodes and prefills in one forward (onnx's mixed-step graph): that step against the same
    # step as two forwards, logits and cache (validate.mixed_step_error)
    mixed_step_max_abs_error: Optional[float] = None


class TargetEntry(_Model):
    _ADDED = frozenset({"precision", "goldens"})

    format: TargetFormat
    status: Literal["valid", "skipped"]
    files: list[FileEntry] = []
    dtype: str = "float32"
    io: Optional[IOSignature] = None
    shapes: Optional[ShapeBounds] = None
    toolchain: dict[str, str] = {}  # opset, torch version, TensorRT version, ...
    compatibility: dict[str, Union[str, int, float, list, None]] = {}  # GPU compute capability etc.
    validation: ValidationSummary
    precision: Optional[Precision] = None  # None: fp32
    # This target's own greedy continuations of the goldens' prompts, when a reduced precision makes them differ
    # from the reference's (the manifest-level goldens); `inferneo validate` re-checks these for this target.
    goldens: Optional[list["Golden"]] = None


class ModelDims(_Model):
    _ADDED = frozenset({"tied_embeddings", "experts", "experts_per_token", "expert_parameters"})

    model_type: str
    family: str
    num_layers: Count
    hidden: Count
    heads: Count
    kv_heads: Count
    head_dim: Count
    vocab: Count
    max_positions: Count
    tied_embeddings: Optional[bool] = None  # the output head is the embedding table (None: not recorded)
    # mixture of experts: a token reads experts_per_token of each sparse layer's experts, whose weights together
    # hold expert_parameters of the model's parameters (all sparse layers)
    experts: Optional[Count] = None
    experts_per_token: Optional[Count] = None
    expert_parameters: Optional[Annotated[int, Field(ge=0, le=1 << 44)]] = None  # up to ~17e12 parameters


class AdapterInfo(_Model):
    """A LoRA adapter merged into the weights before export."""

    path: str
    sha256: str  # over adapter_config.json and the adapter weights
    rank: Count
    alpha: Finite
    target_modules: list[str]
    base_model: Optional[str] = None  # adapter_config.json's base_model_name_or_path


class SourceInfo(_Model):
    _ADDED = frozenset({"adapters", "allow_pickle", "trust_remote_code"})

    kind: Literal["hf", "path", "gguf", "s3"]
    uri: str
    revision: Optional[str] = None
    weights_sha256: str  # of the base checkpoint (adapters carry their own hashes)
    adapters: list[AdapterInfo] = []
    # The recipe's opt-ins, recorded only when given (true); absent means off: no pickle, no checkpoint code.
    allow_pickle: Optional[bool] = None
    trust_remote_code: Optional[bool] = None


class Golden(_Model):
    prompt: str
    prompt_ids: list[TokenId]
    tokens: list[TokenId]  # the PyTorch reference's greedy continuation


class EncoderGolden(_Model):
    text: str
    values: list[Finite]  # the reference's output for `text` (pooled embedding or class logits), float32 rounded


class EncoderInfo(_Model):
    """How an encoder artifact turns texts into its output (tasks feature-extraction, text-classification)."""

    _ADDED = frozenset({"function_to_apply", "lowercase", "prompt", "include_prompt", "graph_modules", "prompts"})

    output: Literal["embedding", "logits"]
    # embedding only
    pooling: Optional[Literal["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]] = None
    normalize: bool = False  # L2-normalize embeddings
    max_length: Count  # tokens per text (longer texts are truncated)
    dim: Count  # embedding size, or number of labels
    labels: Optional[list[str]] = None  # text-classification: label of each logit
    # text-classification scores, as transformers' pipeline picks them from problem_type / num_labels; unset: softmax
    # (a sigmoid for one logit). Written only when it differs, so older runtimes refuse what they would score wrong.
    function_to_apply: Optional[Literal["softmax", "sigmoid", "none"]] = None
    lowercase: Optional[bool] = None  # lowercase texts before tokenizing (sentence-transformers do_lower_case)
    prompt: Optional[str] = None  # prepended to every text (sentence-transformers default_prompt_name)
    # sentence-transformers' named prompts (config_sentence_transformers.json), for embed(prompt_name=...)
    prompts: Optional[dict[str, str]] = None
    include_prompt: Optional[bool] = None  # False: the prompt's tokens are left out of pooling (as ST's Pooling)
    # the sentence-transformers modules the targets' graphs apply after the encoder, in order (e.g. "Pooling mean",
    # "Dense 768->3072 (identity, no bias)"): the graph's output is then the pooled embedding [batch, dim] and the
    # runtime only normalizes it. Unset: the graph returns token states, pooled by the runtime.
    graph_modules: Optional[list[str]] = None
    # the reference's outputs for the validation texts; a target must stay within its validation tolerance's cosine
    goldens: list[EncoderGolden] = []


class GenerationDefaults(_Model):
    eos_token_ids: list[TokenId] = []
    bos_token_id: Optional[TokenId] = None
    pad_token_id: Optional[TokenId] = None


class Manifest(_Model):
    _ADDED = frozenset({"encoder"})

    schema_version: int
    name: str
    task: Task
    architecture: str
    model: ModelDims
    source: SourceInfo
    generation: GenerationDefaults
    root_files: list[FileEntry]
    targets: dict[str, TargetEntry]
    goldens: list[Golden]
    toolchain: dict[str, str]
    built_at: str
    recipe_sha256: str
    inferneo_version: str
    # recipe + source weights/config + toolchain; equal keys mean a rebuild would produce the same artifact
    build_key: Optional[str] = None
    encoder: Optional[EncoderInfo] = None  # encoder tasks only

    def listed_root_files(self) -> set[str]:
        """The root files this manifest lists (and a signature covers): the only ones the runtime reads."""
        return {f.path for f in self.root_files}

    def valid_targets(self) -> list[str]:
        return [name for name, t in self.targets.items() if t.status == "valid"]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def read_manifest(artifact_dir: Path) -> Manifest:
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; is {artifact_dir} an Inferneo artifact directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: manifest must be a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        loc, msg = pydantic_problem(e)
        raise ManifestError(f"{path}: field {'.'.join(str(p) for p in loc)}: {msg}") from None


def sha256_file(path: Path, chunk: int = 8 << 20, on_bytes: Optional[Callable[[int], None]] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), size=path.stat().st_size)


def verify_files(root: Path, entries: list[FileEntry], on_bytes: Optional[Callable[[int], None]] = None) -> None:
    """Check size then sha256 of each listed file; raise naming the first file that does not match. `on_bytes`
    is called with each block's size as it is hashed (a progress bar)."""
    root = Path(root)
    real_root = root.resolve()
    for entry in entries:
        path = root / entry.path
        if not path.resolve().is_relative_to(real_root):
            raise IntegrityError(f"{path}: resolves outside the artifact directory (symlink?); refused")
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{path}: size {size} does not match the manifest's {entry.size}")
        digest = sha256_file(path, on_bytes=on_bytes)
        if digest != entry.sha256:
            raise IntegrityError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
