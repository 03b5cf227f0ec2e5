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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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


class HubSource(_Strict):
    hf: str = Field(description="Hugging Face repo id, read from the local HF cache (offline)")
    revision: Optional[str] = None
    tokenizer: TokenizerOverrides = TokenizerOverrides()


class PathSource(_Strict):
    path: Path = Field(description="local directory holding an HF checkpoint (config.json + weights)")
    tokenizer: TokenizerOverrides = TokenizerOverrides()


class GGUFSource(_Strict):
    gguf: Path = Field(description="GGUF file; relative to the installed `package` when that is given")
    package: Optional[str] = Field(None, description="installed distribution that ships the GGUF file")
    tokenizer: TokenizerOverrides = TokenizerOverrides()


Source = Union[HubSource, PathSource, GGUFSource]


# A target's name is its folder in the artifact: a plain name, never a path.
TARGET_NAME = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="target folder name")


class OnnxTarget(_Strict):
    format: Literal["onnx"]
    name: Optional[str] = TARGET_NAME
    opset: int = Field(17, ge=17, le=23)
    optional: bool = False


class TorchScriptTarget(_Strict):
    format: Literal["torchscript"]
    name: Optional[str] = TARGET_NAME
    optional: bool = False


class TensorRTTarget(_Strict):
    format: Literal["tensorrt"]
    name: Optional[str] = TARGET_NAME
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    optional: bool = False


Target = Annotated[Union[OnnxTarget, TorchScriptTarget, TensorRTTarget], Field(discriminator="format")]


class Shapes(_Strict):
    max_batch: int = Field(4, ge=1, le=256)
    max_sequence: int = Field(2048, ge=16, le=131072)


class Validation(_Strict):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    logits_atol: float = Field(1e-3, gt=0)


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    source: Source
    task: Literal["text-generation"] = "text-generation"
    dtype: Literal["float32"] = "float32"
    targets: list[Target] = Field(min_length=1)
    shapes: Shapes = Shapes()
    validation: Validation
    output: Optional[Path] = None

    @field_validator("source", mode="before")
    @classmethod
    def _one_source_kind(cls, v):
        kinds = [k for k in ("hf", "path", "gguf") if isinstance(v, dict) and k in v]
        if isinstance(v, dict) and len(kinds) != 1:
            raise ValueError("give exactly one of hf, path or gguf" + (f" (got {', '.join(kinds)})" if kinds else ""))
        return v

    @model_validator(mode="after")
    def _unique_target_names(self):
        names = [t.name or t.format for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: duplicate target name(s) {', '.join(dupes)}; give each a distinct `name`")
        return self

    @property
    def output_dir(self) -> Path:
        return self.output or Path("artifacts") / self.name

    def target_name(self, target) -> str:
        return target.name or target.format

    def sha256(self) -> str:
        """Hash of the normalized recipe (field order and YAML formatting do not matter)."""
        payload = json.dumps(self.model_dump(mode="json", exclude={"output"}), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _union_tags() -> set[str]:
    sources = {c.__name__ for c in get_args(Source)}
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
    if isinstance(src, PathSource):
        if not (src.path / "config.json").is_file():
            raise RecipeError(f"{path}:{_line_of(text, ['source', 'path'])}: source.path: "
                              f"{src.path} is not an HF checkpoint directory (no config.json)")
    elif isinstance(src, GGUFSource) and src.package is None and not src.gguf.is_file():
        raise RecipeError(f"{path}:{_line_of(text, ['source', 'gguf'])}: source.gguf: file {src.gguf} not found")
