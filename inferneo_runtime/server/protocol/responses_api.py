"""POST /v1/responses (OpenAI's Responses API), stateless: the request body, its translation into a chat completion
request (`ResponsesRequest.to_chat`: the chat path renders, samples, parses tool calls and splits the reasoning), and
the response object with its output items.

  https://platform.openai.com/docs/api-reference/responses/create

What this server cannot honour is a 400 naming the parameter, never ignored: `previous_response_id` and
`conversation` (nothing is stored), `background`, `prompt` (stored prompts), `include`, `reasoning` (effort and
summaries: the model thinks as its template says), `max_tool_calls`, `top_logprobs`, `truncation: "auto"`, a
`text.verbosity`, built-in tools (web_search, file_search, ...), input items other than messages, function calls,
their outputs and reasoning (item references need storage), and content other than text (images, files, audio).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError, field_validator

from ...errors import pydantic_problem
from .common import MAX_MESSAGES, MODEL_HELP, OpenAIBaseModel, ParamError, _SamplingExtensions
from .requests import TOOL_CHOICES, ChatCompletionRequest, _ChatTemplateOptions

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
# the chat request's field -> the Responses API's, for the `param` of an error found on the chat path
CHAT_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
               "response_format": "text.format"}


class ResponsesFunctionTool(OpenAIBaseModel):
    """Responses' flat function tool (chat nests the same fields under `function`)."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="letters, digits, _ . - (OpenAI's rule), at most 64")
    description: Optional[str] = Field(None, max_length=100_000)
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    def to_chat(self) -> dict:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class TextFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(None, max_length=64)
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None

    def to_response_format(self) -> Optional[dict]:
        """Chat's response_format for this format (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.schema_ is None:
            raise ParamError("text.format: a json_schema format needs its `schema`", param="text.format")
        return {"type": "json_schema",
                "json_schema": {"name": self.name or "response", "schema": self.schema_, "strict": self.strict}}


class TextConfig(OpenAIBaseModel):
    format: Optional[TextFormat] = None
    verbosity: Optional[str] = None


class ResponsesRequest(_ChatTemplateOptions, _SamplingExtensions, OpenAIBaseModel):
    """POST /v1/responses (OpenAI's fields, then chat's extension blocks, passed on to the chat path)."""

    model: Optional[str] = Field(None, max_length=512, description=MODEL_HELP)
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = Field(None, description="a system message before the input")
    max_output_tokens: Optional[int] = Field(None, ge=1)
    metadata: Optional[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]] = Field(
        None, max_length=16, description="up to 16 pairs, echoed in the response")
    parallel_tool_calls: Optional[bool] = None
    stream: bool = False
    store: Optional[bool] = Field(None, description="accepted; nothing is stored, and the response says store: false")
    temperature: Optional[float] = Field(None, ge=0, le=2)
    text: Optional[TextConfig] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    tools: Optional[Annotated[list[ResponsesFunctionTool], Field(max_length=256)]] = None
    top_p: Optional[float] = Field(None, gt=0, le=1)
    user: Optional[str] = Field(None, max_length=512)
    # refused when set (see the module's docstring)
    previous_response_id: Optional[str] = None
    conversation: Optional[Any] = None
    background: Optional[bool] = None
    prompt: Optional[Any] = None
    include: Optional[list[Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    max_tool_calls: Optional[int] = None
    top_logprobs: Optional[int] = None
    truncation: Optional[str] = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_or_items(cls, v):  # before the union is tried, so the 400 says what is wrong
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string or a non-empty list of input items")
        if len(v) > MAX_MESSAGES:
            raise ValueError(f"{len(v)} input items are more than {MAX_MESSAGES}")
        bad = next((i for i, item in enumerate(v) if not isinstance(item, dict)), None)
        if bad is not None:
            raise ValueError(f"input[{bad}]: an input item is an object")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, v):
        for i, tool in enumerate(v if isinstance(v, list) else ()):  # not a list: pydantic's 400 says so
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}]: tools of type {str(kind)[:40]!r} (built-in tools) are not supported by "
                                 f"this server; only function tools")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_shape(cls, v):
        if v is None or v in TOOL_CHOICES:
            return v
        if not (isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("name"), str)
                and set(v) <= {"type", "name"}):
            raise ValueError('must be "auto", "none", "required" or {"type": "function", "name": ...}; other '
                             'choices (built-in tools, allowed_tools) are not supported by this server')
        return v

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field set that this stateless server cannot honour."""
        refused = {
            "previous_response_id": (self.previous_response_id is not None, "this server stores no responses: send "
                                     "the whole conversation as `input`"),
            "conversation": (self.conversation is not None, "this server stores no conversations: send the whole "
                             "conversation as `input`"),
            "background": (bool(self.background), "background responses need storage"),
            "prompt": (self.prompt is not None, "stored prompts are not available: send `instructions`"),
            "include": (bool(self.include), "no extra output data can be included"),
            "reasoning": (bool(self.reasoning) and any(v is not None for v in self.reasoning.values()),
                          "reasoning effort and summaries cannot be set: the model reasons as its chat template says "
                          "(chat_template_kwargs, e.g. {\"enable_thinking\": false}, may turn it off)"),
            "max_tool_calls": (self.max_tool_calls is not None, "use parallel_tool_calls: false for one call"),
            "top_logprobs": (bool(self.top_logprobs), "logprobs are not returned by /v1/responses"),
            "truncation": (self.truncation not in (None, "disabled"), "input is never truncated: a conversation "
                           "longer than the context is a 400"),
            "text.verbosity": (self.text is not None and self.text.verbosity not in (None, "medium"),
                               "verbosity cannot be set"),
        }
        for param, (bad, why) in refused.items():
            if bad:
                raise ParamError(f"{param}: not supported by this server ({why})", param=param)

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completion request this one means; a 400 names the Responses field."""
        self.refuse_unsupported()
        fmt = self.text.format if self.text is not None else None
        fields = {
            "model": self.model, "messages": input_messages(self.input, self.instructions),
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls, "stream": self.stream, "user": self.user,
            "tools": [t.to_chat() for t in self.tools] if self.tools else None,
            "tool_choice": ({"type": "function", "function": {"name": self.tool_choice["name"]}}
                            if isinstance(self.tool_choice, dict) else self.tool_choice),
            "response_format": fmt.to_response_format() if fmt is not None else None,
            **self.model_dump(include=set(_SamplingExtensions.model_fields) | set(_ChatTemplateOptions.model_fields),
                              exclude_unset=True),
        }
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as e:
            where, message = pydantic_problem(e)
            param = CHAT_PARAMS.get(str(where[0]), str(where[0])) if where else None
            raise ParamError(f"{param}: {message}" if param else message, param=param) from None

    def echo(self) -> dict:
        """The request's fields that a response repeats."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {},
                "parallel_tool_calls": self.parallel_tool_calls is not False,
                "text": self.text.model_dump(by_alias=True, exclude_none=True) if self.text and self.text.format
                else {"format": {"type": "text"}},
                "tool_choice": self.tool_choice or "auto",
                "tools": [t.model_dump(exclude_none=True) for t in self.tools or ()], "user": self.user}


# -- input items -> chat messages -----------------------------------------------------------------------------------
def input_messages(items: Union[str, list[dict]], instructions: Optional[str]) -> list[dict]:
    """Chat messages for `instructions` and `input`: messages keep their role (developer becomes system, which chat
    templates know); function calls become an assistant message's tool_calls (consecutive calls: one message), their
    outputs `role: tool` messages; a reasoning item's text goes with the next assistant message as its reasoning."""
    messages = [{"role": "system", "content": instructions}] if instructions is not None else []
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    reasoning: Optional[str] = None  # a reasoning item's text, waiting for its assistant message

    def assistant(content: Optional[str]) -> dict:
        nonlocal reasoning
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"], reasoning = reasoning, None
        messages.append(message)
        return message

    def flush_reasoning() -> None:  # reasoning that ended its response (cut off): an assistant turn of its own
        if reasoning is not None:
            assistant("")

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise ParamError(f"{where}.role: {str(role)[:40]!r} is not one of {', '.join(ROLES)}", param="input")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                assistant(text)
            else:
                flush_reasoning()
                messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or reasoning is not None:
                last = assistant(None)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            flush_reasoning()
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            if item.get("encrypted_content") is not None:
                raise ParamError(f"{where}.encrypted_content: encrypted reasoning cannot be read by this server",
                                 param="input")
            flush_reasoning()
            parts = item.get("content") or item.get("summary") or []
            reasoning = "\n\n".join(_text([p], f"{where}.content") for p in parts) if isinstance(parts, list) else \
                _text(parts, f"{where}.content")
        else:
            raise ParamError(f"{where}: input items of type {str(kind)[:40]!r} are not supported by this server "
                             f"(messages, function_call, function_call_output and reasoning are)", param="input")
    flush_reasoning()
    return messages


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ParamError(f"{where}.{key}: a string is required", param="input")
    return value


def _text(content: Any, where: str) -> str:
    """The text of a content string or list of text parts (input_text, output_text, reasoning_text, ...)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParamError(f"{where}: a string or a list of text parts is required", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("refusal" if kind == "refusal" else "text") if isinstance(part, dict) else None
        if kind not in (*TEXT_PARTS, "refusal", "reasoning_text", "summary_text") or not isinstance(text, str):
            raise ParamError(f"{where}[{j}]: content of type {str(kind)[:40]!r} is not supported by this server; "
                             f"only text ({', '.join(TEXT_PARTS)})", param="input")
        texts.append(text)
    return "".join(texts)


# -- the response -----------------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: str
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list = Field(default_factory=list)
    content: list[ReasoningText]
    status: str


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = Annotated[Union[ReasoningItem, OutputMessage, FunctionCallItem], Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # per-request prefix-cache hits are not tracked (the totals are in /metrics)
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    store: Literal[False] = False  # nothing is stored, whatever the request's `store`
    temperature: Optional[float] = None
    text: dict = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Union[str, dict] = "auto"
    tools: list[dict] = Field(default_factory=list)
    top_p: Optional[float] = None
    truncation: Literal["disabled"] = "disabled"
    background: Literal[False] = False
    usage: Optional[ResponsesUsage] = None
    user: Optional[str] = None
