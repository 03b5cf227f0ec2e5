"""OpenAI-compatible request and response models (pydantic).

Request fields follow the order of OpenAI's API reference:
  https://platform.openai.com/docs/api-reference/completions/create
  https://platform.openai.com/docs/api-reference/chat/create
Inferneo's extensions (vLLM's names) sit after them in one marked block. Unknown fields are accepted and
logged, since clients send fields a server does not implement; OpenAI fields this server cannot honour
(suffix, echo with logprobs, best_of > n) are rejected with a 400.

A request turns itself into SamplingParams with one precedence: the request's value, else the server's
default, else the OpenAI API default (`to_sampling_params`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import RequestError
from ..sampling import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger("inferneo.server")

# OpenAI's defaults where a request leaves a sampling field unset.
API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MODEL_HELP = ("a model name (its newest version), name@version, or an A/B test's name; omitted or \"auto\": "
              "routed by the server's routing rules (OpenAI requires it; Inferneo extension: optional)")
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class ParamError(RequestError):
    """A request error about one field, which the error response names in `param`."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


MAX_MESSAGES = 100_000  # a hard bound checked before the messages are validated (max_messages is the setting)
ShortText = Annotated[str, Field(max_length=256)]  # roles, names, types, ids: never long


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields and logs them (once per request) instead of failing. Floats must be finite
    (Infinity and NaN are 400s naming the field)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:  # names are the client's: quoted and capped, so they cannot forge log lines
            names = sorted(self.model_extra)
            shown = ", ".join(repr(n[:40]) for n in names[:8])
            shown += f" and {len(names) - 8} more" if len(names) > 8 else ""
            logger.warning("%s: ignoring unknown field(s): %s", type(self).__name__, shown)
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingExtensions(BaseModel):
    """Inferneo extensions, shared by both endpoints. Listed first among a request's bases, so pydantic
    orders these fields after the OpenAI ones."""

    model_config = ConfigDict(allow_inf_nan=False)

    # --- Inferneo extensions (not in OpenAI's API) -------------------------------------------------
    top_k: Optional[int] = Field(None, ge=-1, description="sample from the k most likely tokens (0 or -1: all)")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="drop tokens below min_p x the top probability")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="transformers' rule over prompt + output; "
                                                                        "1 = off")
    min_tokens: int = Field(0, ge=0, description="generate at least this many tokens before EOS or stop tokens")
    ignore_eos: bool = Field(False, description="keep generating past the EOS token")
    stop_token_ids: Optional[list[TokenId]] = Field(None, description="token ids that end generation, like EOS")
    speculative_tokens: Optional[int] = Field(None, ge=0, le=16, description="tokens drafted per step by speculative "
                                              "decoding (0: off; unset: the server's setting); output is unchanged")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string that ended the text in it")
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the output text")
    # structured outputs (vLLM's names; structured.py): at most one of these, or chat's response_format
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="a JSON schema the output must match")
    guided_regex: Optional[str] = Field(None, max_length=10_000, description="a regex the output must fullmatch")
    guided_choice: Optional[list[str]] = Field(None, max_length=1024, description="the output is one of these")
    guided_grammar: Optional[str] = Field(None, max_length=100_000, description="a Lark grammar for the output")
    # --- end of extensions -------------------------------------------------------------------------


class _Sampling:
    """What both request types share: reading fields with request > server default > API default."""

    def _value(self, name: str, defaults: dict):
        value = getattr(self, name)
        if value is None:
            value = defaults.get(name, API_DEFAULTS.get(name))
        return value

    def _stops(self) -> tuple[str, ...]:
        stop = self.stop
        return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int], defaults: Optional[dict],
                         seed_offset: int, constraint=None) -> SamplingParams:
        defaults = defaults or {}
        seed = self.seed if self.seed is None else self.seed + seed_offset
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=min(self.min_tokens, max_tokens),
            temperature=self._value("temperature", defaults), top_k=self._value("top_k", defaults),
            top_p=self._value("top_p", defaults), min_p=self._value("min_p", defaults),
            repetition_penalty=self._value("repetition_penalty", defaults),
            presence_penalty=self._value("presence_penalty", defaults),
            frequency_penalty=self._value("frequency_penalty", defaults),
            seed=seed, stop=self._stops(), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, speculative_tokens=self.speculative_tokens,
            logit_bias=self._logit_bias(), include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            constraint=constraint or self._constraint())

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias: {"token id": bias in [-100, 100]}. (The vocabulary bound is checked with the model.)"""
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"\s*[0-9]{1,10}\s*", key) or int(key) > 2**31 - 1:
                raise ParamError(f"logit_bias: {key[:40]!r} is not a token id (a non-negative integer)",
                                 param="logit_bias")
            if not -100 <= bias <= 100:
                raise ParamError(f"logit_bias: the bias of token {key} is {bias}; it must be in [-100, 100]",
                                 param="logit_bias")
            out.append((int(key), float(bias)))
        return tuple(out)

    def _constraint(self):
        """Structured outputs: response_format (chat) or guided_* as a structured.Constraint (None: free text)."""
        from ..structured import ConstraintError, make_constraint

        try:
            return make_constraint(getattr(self, "response_format", None), self.guided_json, self.guided_regex,
                                   self.guided_choice, self.guided_grammar)
        except ConstraintError as e:
            raise ParamError(str(e), param=e.param) from None

    def _reject_unsupported(self, checks: dict[str, bool]) -> None:
        for name, bad in checks.items():
            if bad:
                raise ParamError(f"{name}: not supported by this server", param=name.split()[0])


class _CompletionFields(OpenAIBaseModel):
    # OpenAI's order: https://platform.openai.com/docs/api-reference/completions/create
    model: Optional[str] = Field(None, max_length=512, description=MODEL_HELP)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    best_of: Optional[int] = Field(None, ge=1)
    echo: bool = False
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=1024)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    suffix: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    user: Optional[str] = Field(None, max_length=512)

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        return self


class CompletionRequest(_SamplingExtensions, _CompletionFields, _Sampling):
    """POST /v1/completions (OpenAI's fields first, then the extension block)."""

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def to_sampling_params(self, defaults: Optional[dict] = None, seed_offset: int = 0) -> SamplingParams:
        self._reject_unsupported({"suffix": self.suffix is not None,
                                  "echo with logprobs": self.echo and self.logprobs is not None,
                                  "best_of other than n": self.best_of not in (None, self.n)})
        max_tokens = self.max_tokens or (defaults or {}).get("max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS
        return self._sampling_params(max_tokens, self.logprobs, defaults, seed_offset)


class ContentPart(OpenAIBaseModel):
    type: ShortText
    text: Optional[str] = None


class FunctionCall(OpenAIBaseModel):
    name: str = Field(max_length=256)
    arguments: str = Field(description="the call's arguments: a JSON object, as text")


class MessageToolCall(OpenAIBaseModel):
    """A tool call of an earlier assistant message, sent back by the client."""

    id: Optional[ShortText] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: ShortText
    content: Optional[Union[str, Annotated[list[ContentPart], Field(max_length=1024)]]] = None
    name: Optional[ShortText] = None
    tool_calls: Optional[Annotated[list[MessageToolCall], Field(max_length=128)]] = None  # role assistant
    tool_call_id: Optional[ShortText] = None  # role tool: the call this message answers

    def to_template(self, index: int) -> dict:
        """The message as chat templates read it. A tool call's arguments become a dict, as vLLM passes them and
        as HF templates (Qwen2.5/3, Llama 3.x, Hermes) expect (they render `arguments | tojson`)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                try:
                    args = json.loads(call.function.arguments)
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise ParamError(f"messages[{index}].tool_calls[{j}].function.arguments is not a JSON object",
                                     param="messages")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": args}})
            out["tool_calls"] = calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(f"message content of type {part.type!r} is not supported; only text")
            parts.append(part.text)
        return "".join(parts)


class ResponseFormat(OpenAIBaseModel):
    type: str
    json_schema: Optional[dict[str, Any]] = None  # {"name", "schema", "strict"} with type "json_schema"


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="letters, digits, _ . - (OpenAI's rule), at most 64")
    description: Optional[str] = Field(None, max_length=100_000)
    parameters: Optional[dict[str, Any]] = Field(None, description="a JSON schema of the arguments object")
    strict: Optional[bool] = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


TOOL_CHOICES = ("auto", "none", "required")


class _ChatFields(OpenAIBaseModel):
    # OpenAI's order: https://platform.openai.com/docs/api-reference/chat/create
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _not_too_many(cls, v):  # before each message is validated: a list of 270k messages fails at once
        if isinstance(v, list) and len(v) > MAX_MESSAGES:
            raise ValueError(f"{len(v)} messages are more than {MAX_MESSAGES}")
        return v
    model: Optional[str] = Field(None, max_length=512, description=MODEL_HELP)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=1024)
    logprobs: bool = False
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    n: int = Field(1, ge=1, le=128)
    parallel_tool_calls: Optional[bool] = Field(None, description="false: at most one tool call (enforced with "
                                                "tool_choice required or named)")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    response_format: Optional[ResponseFormat] = None
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    tool_choice: Optional[Union[str, dict[str, Any]]] = Field(None, description="auto, none, required, or "
                                                              "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    tools: Optional[Annotated[list[ChatTool], Field(max_length=256)]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    user: Optional[str] = Field(None, max_length=512)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_shape(cls, v):
        if v is None or v in TOOL_CHOICES:
            return v
        fn = v.get("function") if isinstance(v, dict) else None
        if not (isinstance(v, dict) and v.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and set(v) <= {"type", "function"}):
            raise ValueError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class _ChatTemplateOptions(BaseModel):
    """vLLM's chat template fields (chat completions and /tokenize)."""

    # --- Inferneo extensions (vLLM's names) ----------------------------------------------------------
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant turn's opening")
    continue_final_message: bool = Field(False, description="let the model continue the last message (no new turn)")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, max_length=64, description="extra variables for "
                                                           "the chat template, e.g. {\"enable_thinking\": false}")
    # --- end of extensions -------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_template_options(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true "
                             "(set add_generation_prompt: false)")
        for key in self.chat_template_kwargs or {}:  # template variable names; never the renderer's own
            if not key.isidentifier() or key.startswith("_") or len(key) > 64:
                raise ValueError(f"chat_template_kwargs: {key[:40]!r} is not a template variable name")
        return self

    def template_options(self) -> dict:
        """Tokenizer.encode_chat's options for this request (the server adds `template`)."""
        return {"continue_final_message": self.continue_final_message,
                "template_kwargs": self.chat_template_kwargs or None}


class ChatCompletionRequest(_ChatTemplateOptions, _SamplingExtensions, _ChatFields, _Sampling):
    """POST /v1/chat/completions (OpenAI's fields first, then the extension blocks)."""

    def message_dicts(self) -> list[dict]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    # -- tool calls (inferneo_runtime/tool_calls.py) ---------------------------------------------------------
    def offered_tools(self) -> Optional[list[dict]]:
        """The tools given to the chat template (as HF's apply_chat_template(tools=...) takes them: the request's
        tool dicts), after checking them against tool_choice; None: no tools, or tool_choice "none"."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise ParamError("tool_choice needs tools: the request has none", param="tool_choice")
            return None
        names = [t.function.name for t in self.tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ParamError(f"tools: two tools are named {dup!r}", param="tools")
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise ParamError(f"tool_choice names the function {choice['function']['name'][:64]!r}, which is not "
                             f"one of the tools ({', '.join(names)})", param="tool_choice")
        if choice == "none":
            return None
        constrained = [name for name, value in (("response_format", self.response_format and
                                                 self.response_format.type != "text"),
                                                ("guided_json", self.guided_json is not None),
                                                ("guided_regex", self.guided_regex is not None),
                                                ("guided_choice", self.guided_choice is not None),
                                                ("guided_grammar", self.guided_grammar is not None)) if value]
        if constrained:
            raise ParamError(f"tools and {constrained[0]} cannot be combined: a tool call has its own format "
                             f"(or set tool_choice: none)", param=constrained[0])
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def tool_constraint(self, parser, tools: list[dict]):
        """The structured-output constraint that forces a call in `parser`'s format: tool_choice "required" (to
        any of the tools) or a named function; None for "auto"."""
        from ..structured import Constraint, ConstraintError

        choice = self.tool_choice
        if choice in (None, "auto"):
            return None
        if isinstance(choice, dict):
            tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
        parallel = self.parallel_tool_calls is not False and choice == "required"
        constraint = Constraint("grammar", parser.grammar(tools, parallel), "tools")
        try:
            constraint.grammar()  # a tool's parameters that are not a usable JSON schema: a 400 now
        except ConstraintError as e:
            raise ParamError(f"tools: a function's parameters are not a JSON schema this server can enforce: "
                             f"{str(e).split(': ', 1)[-1]}", param="tools") from None
        return constraint

    def to_sampling_params(self, default_max_tokens: int, defaults: Optional[dict] = None,
                           seed_offset: int = 0, tool_constraint=None,
                           keep_special_tokens: bool = False) -> SamplingParams:
        """`default_max_tokens` (the rest of the context, or the server's default) applies when the request
        sets none. `tool_constraint`: tool_constraint()'s; `keep_special_tokens`: the tool-call parser reads a
        special token (mistral's [TOOL_CALLS]), so it stays in the text."""
        max_tokens = self.requested_max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self._sampling_params(max_tokens, logprobs, defaults, seed_offset, constraint=tool_constraint)
        if keep_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)
        return params


# -- responses --------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ResponseMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[ResponseToolCall]] = None  # set when the output was parsed into tool calls


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # {"role": ...} first, then {"content": ...} or {"tool_calls": [...]}, {} with the
    # finish_reason
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


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
