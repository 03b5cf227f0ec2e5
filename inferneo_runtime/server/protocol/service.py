"""Model cards, the error body, vLLM's tokenizer endpoints, embeddings, and the management API's bodies."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .common import MAX_MESSAGES, MODEL_HELP, OpenAIBaseModel, TokenId
from .requests import ChatMessage, ChatTool, _ChatTemplateOptions



class ModelCard(BaseModel):
    """OpenAI's model object, plus what Inferneo knows of the served model (manifest, version, memory)."""

    model_config = ConfigDict(protected_namespaces=(), extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferneo"
    # --- Inferneo extensions -------------------------------------------------------------------------
    name: Optional[str] = None
    version: Optional[str] = None
    versions: Optional[list[str]] = None
    loaded: bool = False
    state: Optional[str] = None
    kind: Optional[str] = Field(None, description="artifact | checkpoint (compiled on demand) | file (bare, "
                                                  "unvalidated) | custom")
    source: Optional[str] = None
    architecture: Optional[str] = None
    format: Optional[str] = None
    target: Optional[str] = None
    dtype: Optional[str] = None
    precision: Optional[str] = None
    parameters: Optional[int] = Field(None, description="estimated: the target's weight bytes / dtype size")
    weight_bytes: Optional[int] = None
    memory: Optional[dict[str, Any]] = None
    max_context: Optional[int] = None
    max_batch: Optional[int] = None
    validated: Optional[bool] = None
    validation: Optional[dict[str, Any]] = None
    targets: Optional[dict[str, dict[str, Any]]] = None
    adapters: Optional[list[dict[str, Any]]] = None
    notes: Optional[list[str]] = None
    error: Optional[str] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


# -- vLLM's tokenizer endpoints ------------------------------------------------------------------------
class TokenizeCompletionRequest(OpenAIBaseModel):
    """POST /tokenize with a prompt."""

    model: Optional[str] = Field(None, max_length=512, description=MODEL_HELP)
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = True


class TokenizeChatRequest(_ChatTemplateOptions, OpenAIBaseModel):
    """POST /tokenize with chat messages, rendered as /v1/chat/completions renders them."""

    model: Optional[str] = Field(None, max_length=512, description=MODEL_HELP)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: Optional[Annotated[list[ChatTool], Field(max_length=256)]] = None  # vLLM's: given to the template

    def message_dicts(self) -> list[dict]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    def offered_tools(self) -> Optional[list[dict]]:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = Field(None, max_length=512, description=MODEL_HELP)
    tokens: list[TokenId] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


# -- embeddings (https://platform.openai.com/docs/api-reference/embeddings/create) -------------------------
class EmbeddingRequest(OpenAIBaseModel):
    input: Union[str, list[str]] = Field(description="a text or a list of texts (token arrays are not accepted)")
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, description="not supported: must be omitted or equal the model's")
    user: Optional[str] = Field(None, max_length=512)
    prompt_name: Optional[str] = Field(None, max_length=128, description="Inferneo extension (as TEI's): one of the "
                                       "model's sentence-transformers prompts, e.g. Qwen3-Embedding's \"query\"; "
                                       "default: its default prompt, if any")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorResponse(BaseModel):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


# -- model management (Inferneo's own endpoints) --------------------------------------------------------
class _AdminModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


ModelPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]


class RegisterModelRequest(_AdminModel):
    """POST /v1/models: register a model (custom classes only from the command line or config file)."""

    path: ModelPath = Field(description="artifact directory, s3:// URI, checkpoint directory, hub id or model file")
    name: Optional[str] = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    version: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
    format: Optional[Literal["onnx", "torchscript", "pt2", "tensorrt"]] = None
    target: Optional[str] = Field(None, min_length=1, max_length=64)
    tokenizer: Optional[ModelPath] = None
    dtype: Optional[str] = Field(None, max_length=16)
    quantization: Optional[str] = Field(None, max_length=16)
    adapters: Optional[list[ModelPath]] = Field(None, max_length=8)
    load: bool = Field(False, description="load it now (default: on first use)")


class RoutingRuleRequest(_AdminModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    condition: Union[Annotated[str, Field(max_length=1024)], dict[str, Any]]
    model: str = Field(min_length=1, max_length=256)
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)


class ABTestRequest(_AdminModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model_a: str = Field(min_length=1, max_length=256)
    model_b: str = Field(min_length=1, max_length=256)
    traffic_split: float = Field(0.5, ge=0, le=1)
    sticky: Literal["user", "request_id"] = "user"
