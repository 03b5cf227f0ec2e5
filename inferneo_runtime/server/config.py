"""`inferneo serve` settings: a YAML file (--config), INFERNEO_* environment variables, command-line flags.

Precedence, highest first: command-line flags, environment variables, the config file, the defaults below.
Every field has an environment variable named INFERNEO_<FIELD> (INFERNEO_PORT, INFERNEO_HOST,
INFERNEO_MAX_MODELS, INFERNEO_MEMORY_BUDGET_GB, ...); list fields (INFERNEO_ARTIFACTS, INFERNEO_MODELS,
INFERNEO_TRUSTED_KEYS, INFERNEO_ADAPTERS) are comma-separated. A few other names are accepted too
(ENV_ALIASES: INFERNEO_MODEL, INFERNEO_GPU_MEMORY_UTIL, INFERNEO_DRAIN_TIMEOUT).

    # serve.yaml
    models:                       # (`artifacts:` is the same list under its older name)
      - artifacts/smollm2-135m    # an artifact directory, s3:// URI, checkpoint directory, hub id or model file
      - path: s3://models/qwen2-0.5b
        name: qwen
        version: "2"
        target: onnx
      - path: exports/model.onnx
        format: onnx
        tokenizer: artifacts/smollm2-135m
      - path: artifacts/qwen3-0.6b
        reasoning_parser: none    # <think> text stays in the content for this model
    host: 0.0.0.0
    port: 8000
    lazy: true
    max_models: 2
    memory_budget_gb: 4
    max_queue: 128
    registry_path: /var/lib/inferneo/registry.json
    routing:
      default_model: smollm2-135m
      rules:
        - {name: code, condition: "prompt contains 'code'", model: qwen, priority: 10}
        - {name: team, condition: "header x-team == 'ml'", model: qwen@2, priority: 5}
      ab_tests:
        - {name: compare, model_a: smollm2-135m, model_b: qwen, traffic_split: 0.3, sticky: user}

Flags that apply to every model of the command (--model-type, --dtype, --quantization, --adapter, --tokenizer,
--model-class, --reasoning-parser) are the defaults of each `models:` entry, which may set its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping, Optional

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from ..errors import InferneoError, pydantic_problem
from ..model_config import (DTYPES, QUANTIZATIONS, ArtifactConfig, DTypeName, Format, ModelConfig,  # noqa: F401
                            QuantizationName, ReasoningParserName, StrictModel)

DEFAULT_ARTIFACT = Path("artifacts/smollm2-135m")
ENV_PREFIX = "INFERNEO_"
ENV_ALIASES = {"INFERNEO_MODEL": "models", "INFERNEO_GPU_MEMORY_UTIL": "gpu_memory_utilization",
               "INFERNEO_DRAIN_TIMEOUT": "graceful_timeout_s"}
LIST_FIELDS = ("artifacts", "models", "trusted_keys", "adapters", "allowed_hosts", "model_roots", "allowed_origins",
               "allowed_methods", "allowed_headers")
MODEL_LIST_FIELDS = ("artifacts", "models")


class ConfigError(InferneoError):
    """The server settings are invalid, or there is nothing to serve."""

    exit_code = 2


class RoutingRuleConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    condition: str | dict = Field(description="\"prompt contains 'code'\", \"header x-team == 'ml'\", "
                                              "\"user == 'bob'\", \"prompt matches '^def '\", or a mapping")
    model: str = Field(description="a model name, name@version, or an A/B test's name")
    priority: int = 0


class ABTestConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model_a: str
    model_b: str
    traffic_split: float = Field(0.5, ge=0, le=1, description="share of traffic sent to model_b")
    sticky: Literal["user", "request_id"] = Field("user", description="what keeps a caller on one arm: the "
                                                  "request's `user` (else X-User-ID, X-Request-ID), or X-Request-ID")


class RoutingConfig(StrictModel):
    default_model: Optional[str] = Field(None, description="where requests without a model (or model \"auto\") go "
                                         "when no rule matches (default: the only model, if there is one)")
    rules: list[RoutingRuleConfig] = Field(default_factory=list)
    ab_tests: list[ABTestConfig] = Field(default_factory=list)


class ServerConfig(StrictModel):
    # sizes and timeouts must be finite: inf would pass `ge=0` and then fail far from its setting (int(inf) when the
    # prefix cache or the memory budget is sized, a time_t overflow at shutdown)
    model_config = ConfigDict(allow_inf_nan=False)  # (merged with StrictModel's)

    artifacts: list[ModelConfig] = Field(default_factory=list, description="artifact directories or s3:// URIs to "
                                         "serve (older name of `models`; default: artifacts/smollm2-135m if built)")
    models: list[ModelConfig] = Field(default_factory=list, description="model to serve: artifact directory, s3:// "
                                      "URI, HF checkpoint directory or hub id (compiled on demand, needs "
                                      "inferneo[build]), or model.onnx / model.pt / model.plan")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field("info", description="server "
                                                                                        "log level")
    lazy: bool = Field(False, description="load each model on its first request instead of at startup")
    max_models: Optional[int] = Field(None, ge=1, description="most models loaded at once")
    memory_budget_gb: Optional[float] = Field(None, gt=0, description="weights + KV caches of loaded models, "
                                                                      "in GB (1e9 bytes)")
    max_queue: int = Field(256, ge=1, description="most sequences in flight (running + waiting); beyond: 429")
    threads: Optional[int] = Field(None, ge=1, description="intra-op threads per model (default: physical cores)")
    device: str = Field("cpu", description="cpu or cuda[:N]")
    default_max_tokens: Optional[int] = Field(None, ge=1, description="max_tokens when a request sets none (unset: "
                                              "OpenAI's 16 for completions, the rest of the context for chat)")
    generation_config: Literal["auto", "none"] = Field("auto", description="auto: a request's unset temperature, "
                                                       "top_p, top_k, min_p, repetition_penalty and max_tokens take "
                                                       "the model's generation_config.json values (as vLLM); none: "
                                                       "OpenAI's defaults")
    load_wait_s: float = Field(30.0, ge=0, description="how long a request waits for busy models to free the budget")
    graceful_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: /ready turns 503 and running requests get "
                                      "this many seconds to finish; then they end with a 503")

    # -- what each model is (defaults of every `models:` entry) -----------------------------------------
    model_type: Optional[Format] = Field(None, description="the target format to serve (artifacts), build "
                                                 "(checkpoints) or read (model files)")
    model_class: Optional[str] = Field(None, description="module:Class, a subclass of "
                                                 "inferneo_runtime.models.CustomModel")
    tokenizer: Optional[str] = Field(None, description="tokenizer directory for bare model files")
    dtype: DTypeName = Field("auto", description="auto | half | float16 | bfloat16 | float32: pick the "
                                 "target of that precision (artifacts) or build it (checkpoints)")
    quantization: Optional[QuantizationName] = Field(None, description="int8 | int4: pick (or build) a quantized "
                                                                      "ONNX target")
    adapters: list[str] = Field(default_factory=list, description="LoRA adapter directory: merged "
                                  "when a checkpoint is compiled; an artifact must carry it already")
    adapter_type: Literal["lora"] = Field("lora", description="the kind of --adapter (lora, the one supported)")
    max_model_len: Optional[int] = Field(None, ge=16, description="most tokens per sequence (prompt + output); "
                                         "checkpoints are compiled for it, artifacts are capped to it")
    max_batch_size: Optional[int] = Field(None, ge=1, le=256, description="most sequences one engine step runs")
    speculative: Optional[Literal["ngram", "draft"]] = Field(None, description="ngram: draft tokens by n-gram "
                                                             "lookup; draft: with the smaller model "
                                                             "--speculative-model names; either way verified in one "
                                                             "step (same output, fewer passes)")
    speculative_model: Optional[str] = Field(None, min_length=1, description="the draft model of --speculative "
                                             "draft (implied by it): a target of each served artifact (onnx-int4) or "
                                             "another artifact with the same tokenizer; loaded once per model")
    speculative_tokens: int = Field(4, ge=1, le=16, description="most tokens drafted per step "
                                    "(requests may set speculative_tokens themselves; 0 turns it off for one)")
    prefix_cache_mb: float = Field(0, ge=0, description="memory per model for the keys/values of "
                                   "prompt prefixes shared across requests (0: off)")
    prefill_chunk: Optional[int] = Field(None, ge=1, description="most prompt tokens prefilled per "
                                         "engine step, so long prompts do not stall running streams (unset: whole); "
                                         "onnx targets run each chunk in the streams' decode forward, with a second "
                                         "session of the weights")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description="share of the CUDA device's memory "
                                                    "for weights + KV caches (the memory budget); no effect on CPU")
    tensor_parallel_size: int = Field(1, ge=1, description="accepted; above 1 is refused (no backend shards)")
    pipeline_parallel_size: int = Field(1, ge=1, description="accepted; above 1 is refused (no backend shards)")
    trusted_keys: list[str] = Field(default_factory=list, description="Ed25519 public keys artifacts must be "
                                    "signed with (empty: $INFERNEO_TRUSTED_KEYS, else no signature check)")
    registry_path: Optional[str] = Field(None, description="JSON file the model registry is saved to and restored "
                                         "from (models registered over the API survive a restart)")
    routing: RoutingConfig = RoutingConfig()

    # -- the HTTP surface -------------------------------------------------------------------------------
    enable_metrics: bool = Field(True, description="serve Prometheus metrics on /metrics")
    admin_api: bool = Field(True, description="model management endpoints (register/load/unload, routing)")
    admin_token: Optional[str] = Field(None, description="bearer token for the management endpoints; unset: "
                                       "they answer loopback clients of a loopback-bound server only")
    api_key: Optional[str] = Field(None, min_length=1, description="bearer token the inference endpoints "
                                   "(completions, chat, embeddings, model listing, /tokenize, /detokenize) require; "
                                   "unset: they are open. /health, /ready, /metrics and /version stay open")
    served_model_name: Optional[str] = Field(None, min_length=1, max_length=256,
                                             pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                                             description="the name the one configured model is "
                                             "served under, instead of its own (as vLLM)")
    chat_template: Optional[str] = Field(None, description="a Jinja chat template file used instead "
                                         "of each model's own (rendered in the same sandbox)")
    tool_call_parser: Optional[Literal["hermes", "llama3_json", "mistral", "qwen3_coder", "phi4_mini_json", "granite",
                                       "pythonic"]] = Field(
        None, description="hermes, llama3_json, mistral, qwen3_coder, phi4_mini_json, granite or pythonic: the format "
        "model output is parsed for tool calls in (and forced calls are written in); unset: detected from each "
        "model's chat template (inferneo_runtime/tool_calls.py)")
    reasoning_parser: ReasoningParserName = Field("auto", description="auto: split reasoning out of the answer "
                                                    "(into `reasoning` and `reasoning_content`) for models whose chat "
                                                    "template uses gpt-oss's harmony format or <think> and </think>; "
                                                    "none: never; think (or vLLM's deepseek_r1, qwen3): always "
                                                    "<think>; harmony (or vLLM's openai_gptoss): always harmony "
                                                    "(inferneo_runtime/reasoning.py, harmony.py)")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names the management endpoints answer "
                                     "for, beside loopback names, IP addresses and the bind address (DNS rebinding)")
    model_roots: list[str] = Field(default_factory=list, description="directories and s3:// prefixes models may be "
                                   "registered from over the API (empty: the API registers none)")
    allow_unsigned_registration: bool = Field(False, description="let the API register artifacts no trusted key "
                                              "signed (loading a model can run its code)")
    allowed_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call the API "
                                       "(CORS), e.g. https://app.example.com, or * for any (default: none)")
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"], description="HTTP methods allowed from those "
                                       "origins (default *)")
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"], description="request headers allowed from "
                                       "those origins (default *)")
    allow_credentials: bool = Field(False, description="let those origins send cookies and Authorization (never "
                                    "with * as the origin)")
    max_concurrent_requests: Optional[int] = Field(None, ge=1, description="most generation requests in flight; "
                                                   "beyond: 429 (code overloaded)")
    max_request_bytes: int = Field(8 << 20, ge=1024, description="largest request body; beyond: 413")
    max_tokens_limit: Optional[int] = Field(None, ge=1, description="largest max_tokens a request may ask for "
                                            "(default: the model's context)")
    max_n: int = Field(16, ge=1, le=128, description="largest n (choices per prompt)")
    max_prompts: int = Field(64, ge=1, description="most prompts in one completions request")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="most characters of prompt or messages per request")
    max_stop: int = Field(16, ge=0, description="most stop strings, and most stop_token_ids, per request")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string")
    max_streams_per_client: int = Field(16, ge=1, description="concurrent streaming requests per client address; "
                                        "beyond: 429")
    max_sequences_per_client: int = Field(64, ge=1, description="sequences (prompts x n) in flight per client "
                                          "address; beyond: 429")
    max_messages: int = Field(1024, ge=1, description="most chat messages in one request")
    max_chat_default_tokens: int = Field(1024, ge=1, description="the most a chat request without max_tokens "
                                         "generates (with default_max_tokens unset)")
    request_cpu_budget_s: float = Field(5.0, gt=0, description="longest time parsing, templating and tokenizing "
                                        "one request may take; beyond: 400")

    @model_validator(mode="after")
    def _draft_needs_a_model(self):
        if self.speculative == "draft" and self.speculative_model is None:
            raise ValueError("speculative draft needs speculative_model (--speculative-model): the draft model, "
                             "e.g. onnx-int4")
        if self.speculative == "ngram" and self.speculative_model is not None:
            raise ValueError(f"speculative_model {self.speculative_model!r} is for speculative draft, not ngram")
        return self

    @model_validator(mode="after")
    def _credentials_need_named_origins(self):
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("allow_credentials with allowed_origins * would let any web page call the API with "
                             "its visitors' credentials; name the origins")
        return self

    def engine_options(self) -> dict:
        """The EngineDriver settings of every model this server runs."""
        from ..speculative import SpeculativeConfig

        method = self.speculative or ("draft" if self.speculative_model else None)
        spec = SpeculativeConfig(method, self.speculative_tokens, draft=self.speculative_model) if method else None
        return {"speculative": spec,
                "prefix_cache_bytes": int(self.prefix_cache_mb * (1 << 20)), "prefill_chunk": self.prefill_chunk}

    @property
    def memory_budget_bytes(self) -> Optional[int]:
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 1e9)

    def check_parallelism(self) -> None:
        """Tensor and pipeline parallelism are accepted flags, refused until a backend implements them."""
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if value > 1:
                raise ConfigError(f"{flag} {value}: no Inferneo backend shards a model across devices yet "
                                  f"(onnx, torchscript and tensorrt each run on one device); use {flag} 1")


def _split(value) -> list:
    return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)


def _model_list(value) -> list:
    items = _split(value) if isinstance(value, (str, Path)) else list(value)
    return [{"path": str(a).strip()} if isinstance(a, (str, Path)) else a for a in items if str(a).strip()]


def _normalize(values: dict) -> dict:
    for name in MODEL_LIST_FIELDS:
        if values.get(name) is not None:
            values[name] = _model_list(values[name])
    for name in (f for f in LIST_FIELDS if f not in MODEL_LIST_FIELDS):
        if isinstance(values.get(name), str):
            values[name] = _split(values[name].replace(os.pathsep, ",") if name == "trusted_keys" else values[name])
    return values


def _env_variables(env: Mapping[str, str]) -> dict[str, str]:
    """Setting -> the environment variable it is read from (an alias unless its own INFERNEO_<SETTING> is set)."""
    names = {name: var for var, name in ENV_ALIASES.items() if env.get(var)}
    for name in ServerConfig.model_fields:
        var = ENV_PREFIX + name.upper()
        if env.get(var) is not None and env.get(var) != "" and name != "routing":
            names[name] = var
    return names


def _from_env(env: Mapping[str, str]) -> dict:
    return _normalize({name: env[var] for name, var in _env_variables(env).items()})


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
    return _normalize(data)


def load_server_config(config_file: Optional[Path] = None, overrides: Optional[Mapping] = None,
                       env: Optional[Mapping[str, str]] = None) -> ServerConfig:
    """Merge defaults < config file < INFERNEO_* env < `overrides` (flags; None values are ignored)."""
    sources: list[tuple[str, dict]] = []
    if config_file is not None:
        sources.append((str(config_file), _from_file(config_file)))
    env = os.environ if env is None else env
    sources.append(("environment", _from_env(env)))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None and v != [] and v != ()}
    sources.append(("command line", _normalize(flags)))
    merged: dict = {}
    origin: dict[str, str] = {}
    for where, values in sources:
        for k, v in values.items():
            merged[k] = v
            origin[k] = where
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as e:
        loc, msg = pydantic_problem(e)
        field = str(loc[0]) if loc else "?"
        where = origin.get(field, "settings")
        via = f" ({_env_variables(env).get(field, ENV_PREFIX + field.upper())})" if where == "environment" else ""
        path = ".".join(str(p) for p in loc)
        raise ConfigError(f"{where}{via}: {path}: {msg}" if path else f"{where}: {msg}") from None


def artifacts_to_serve(config: ServerConfig, cwd: Optional[Path] = None) -> list[ModelConfig]:
    """The configured models, or the bundled SmolLM2 build when none is configured and it exists.
    Flags of the command fill what each model leaves unset."""
    configured = list(config.artifacts) + list(config.models)
    if not configured and config.model_class is None:
        default = Path(cwd or Path.cwd()) / DEFAULT_ARTIFACT
        if (default / "inferneo.json").is_file():
            configured = [ModelConfig(path=str(DEFAULT_ARTIFACT))]
        elif not config.registry_path or not Path(config.registry_path).is_file():
            raise ConfigError(f"no artifact to serve: none was given and {DEFAULT_ARTIFACT} has not been built. "
                              f"Build it with `make demo` or `inferneo build recipes/smollm2-135m.yaml`, "
                              f"or pass artifact directories: `inferneo serve ARTIFACT [ARTIFACT ...]`")
    if not configured and config.model_class is not None:
        configured = [ModelConfig(path=".")]
    if config.served_model_name is not None:
        if len(configured) != 1:
            raise ConfigError(f"--served-model-name names one model; {len(configured)} are configured (give each "
                              f"a `name:` in the config file instead)")
        configured = [configured[0].model_copy(update={"name": config.served_model_name})]
    return [with_defaults(m, config) for m in configured]


def read_chat_template(config: ServerConfig) -> Optional[str]:
    """--chat-template's text, compiled once here so a broken template stops the server at startup."""
    if config.chat_template is None:
        return None
    from ..tokenizer import compile_chat_template

    try:
        text = Path(config.chat_template).read_text(encoding="utf-8")
        compile_chat_template(text)
    except OSError as e:
        raise ConfigError(f"--chat-template {config.chat_template}: cannot read it: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - jinja2's syntax errors
        raise ConfigError(f"--chat-template {config.chat_template}: not a valid template: {e}") from None
    return text


def with_defaults(m: ModelConfig, config: ServerConfig) -> ModelConfig:
    """`m` with the command's flags filling the fields it leaves unset."""
    fill = {"format": config.model_type, "model_class": config.model_class, "tokenizer": config.tokenizer,
            "dtype": config.dtype, "quantization": config.quantization, "adapters": list(config.adapters),
            "reasoning_parser": config.reasoning_parser}
    return m.model_copy(update={k: v for k, v in fill.items() if getattr(m, k) is None})
