"""`inferneo serve` settings: a YAML file (--config), INFERNEO_* environment variables, command-line flags.

Precedence, highest first: command-line flags, environment variables, the config file, the defaults below.
Every field has an environment variable named INFERNEO_<FIELD> (INFERNEO_PORT, INFERNEO_HOST,
INFERNEO_MAX_MODELS, INFERNEO_MEMORY_BUDGET_GB, ...); INFERNEO_ARTIFACTS is a comma-separated list.

    # serve.yaml
    artifacts:
      - artifacts/smollm2-135m
      - path: s3://models/qwen2-0.5b
        target: onnx
    host: 0.0.0.0
    port: 8000
    lazy: true
    max_models: 2
    memory_budget_gb: 4
    max_queue: 128
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InferneoError

DEFAULT_ARTIFACT = Path("artifacts/smollm2-135m")
ENV_PREFIX = "INFERNEO_"


class ConfigError(InferneoError):
    """The server settings are invalid, or there is nothing to serve."""

    exit_code = 2


class ArtifactConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="artifact directory or s3:// URI")
    target: Optional[str] = Field(None, description="target to serve (default: the preferred valid one)")


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    artifacts: list[ArtifactConfig] = Field(default_factory=list, description="artifacts to serve, by path or URI")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    lazy: bool = Field(False, description="load each model on its first request instead of at startup")
    max_models: Optional[int] = Field(None, ge=1, description="most models loaded at once")
    memory_budget_gb: Optional[float] = Field(None, gt=0, description="weights + KV caches of loaded models, "
                                                                      "in GB (1e9 bytes)")
    max_queue: int = Field(256, ge=1, description="most sequences in flight (running + waiting); beyond: 429")
    threads: Optional[int] = Field(None, ge=1, description="intra-op threads per model (default: physical cores)")
    device: str = "cpu"
    default_max_tokens: Optional[int] = Field(None, ge=1, description="max_tokens when a request sets none (unset: "
                                              "OpenAI's 16 for completions, the rest of the context for chat)")
    load_wait_s: float = Field(30.0, ge=0, description="how long a request waits for busy models to free the budget")
    graceful_timeout_s: float = Field(30.0, ge=0, description="how long shutdown waits for in-flight requests")

    @property
    def memory_budget_bytes(self) -> Optional[int]:
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 1e9)


def _artifact_list(value) -> list:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [{"path": str(a).strip()} if isinstance(a, (str, Path)) else a for a in items if str(a).strip()]


def _from_env(env: Mapping[str, str]) -> dict:
    values = {}
    for name in ServerConfig.model_fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _artifact_list(raw) if name == "artifacts" else raw
    return values


def _from_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of settings")
    if "artifacts" in data and data["artifacts"] is not None:
        data["artifacts"] = _artifact_list(data["artifacts"])
    return data


def load_server_config(config_file: Optional[Path] = None, overrides: Optional[Mapping] = None,
                       env: Optional[Mapping[str, str]] = None) -> ServerConfig:
    """Merge defaults < config file < INFERNEO_* env < `overrides` (flags; None values are ignored)."""
    sources: list[tuple[str, dict]] = []
    if config_file is not None:
        sources.append((str(config_file), _from_file(config_file)))
    sources.append(("environment", _from_env(os.environ if env is None else env)))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None and v != [] and v != ()}
    if "artifacts" in flags:
        flags["artifacts"] = _artifact_list(flags["artifacts"])
    sources.append(("command line", flags))
    merged: dict = {}
    origin: dict[str, str] = {}
    for where, values in sources:
        for k, v in values.items():
            merged[k] = v
            origin[k] = where
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        where = origin.get(field, "settings")
        via = f" (INFERNEO_{field.upper()})" if where == "environment" else ""
        raise ConfigError(f"{where}{via}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def artifacts_to_serve(config: ServerConfig, cwd: Optional[Path] = None) -> list[ArtifactConfig]:
    """The configured artifacts, or the bundled SmolLM2 build when none is configured and it exists."""
    if config.artifacts:
        return list(config.artifacts)
    default = Path(cwd or Path.cwd()) / DEFAULT_ARTIFACT
    if (default / "inferneo.json").is_file():
        return [ArtifactConfig(path=str(DEFAULT_ARTIFACT))]
    raise ConfigError(f"no artifact to serve: none was given and {DEFAULT_ARTIFACT} has not been built. "
                      f"Build it with `make demo` or `inferneo build recipes/smollm2-135m.yaml`, "
                      f"or pass artifact directories: `inferneo serve ARTIFACT [ARTIFACT ...]`")
