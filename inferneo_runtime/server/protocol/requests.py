"""The /v1/completions and /v1/chat/completions request bodies (fields in the order of OpenAI's reference)."""
from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from ...sampling import MAX_LOGPROBS, SamplingParams
from .common import (COMPLETIONS_DEFAULT_MAX_TOKENS, MAX_MESSAGES, MODEL_HELP, OpenAIBaseModel, ParamError,
                     ShortText, StreamOptions, _Sampling, _SamplingExtensions)


def _needs_stream(stream_options, info: ValidationInfo):
    """stream_options only with stream: true (`stream` is declared before it, so it is in `info.data`)."""
    if stream_options is not None and not info.data.get("stream"):
        raise ValueError("stream_options is only allowed with stream: true")
    return stream_options


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

    # field validators (not one model validator), so the 400 names the field in `param`
    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        return _needs_stream(v, info)

    @property
    def samples(self) -> int:
        """Sequences generated per prompt: best_of (the n with the highest log-probability are returned), else n."""
        return self.best_of or self.n


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
        self._reject_unsupported({"suffix": self.suffix is not None})
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        if self.samples != self.n and self.stream:  # as OpenAI: the best are known only at the end
            raise ParamError("best_of other than n is not available with stream: true", param="best_of")
        max_tokens = self.max_tokens or (defaults or {}).get("max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens carry logprobs too (OpenAI's legacy)
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        # best_of ranks samples by their log-probability, so it is computed even when not asked for
        logprobs = self.logprobs if self.logprobs is not None or self.samples == self.n else 0
        return self._sampling_params(max_tokens, logprobs, defaults, seed_offset, prompt_logprobs=prompt_logprobs)


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
    # role assistant: its reasoning, under either name (vLLM's and OpenRouter's, DeepSeek's); the chat template
    # reads `reasoning_content` (Qwen3's does) or `thinking` (gpt-oss's)
    reasoning: Optional[str] = None
    reasoning_content: Optional[str] = None

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
        if self.reasoning_text() is not None:  # as `thinking` too: gpt-oss's template reads that name
            out["reasoning_content"] = out["thinking"] = self.reasoning_text()
        if self.role == "tool" and self.name is not None:
            out["name"] = self.name
        return out

    def reasoning_text(self) -> Optional[str]:
        """The message's reasoning, by whichever name it came (reasoning_content when both)."""
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ParamError(f"message content of type {part.type!r} is not supported; only text",
                                 param="messages")
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

    # field validators (not one model validator), so the 400 names the field in `param`
    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        return _needs_stream(v, info)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


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
        from ...structured import Constraint, ConstraintError

        choice = self.tool_choice
        if choice in (None, "auto"):
            return None
        if isinstance(choice, dict):
            tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
        for tool in tools:  # each schema alone first, so a 400 names the function and the schema's feature
            fn = tool["function"]
            try:
                Constraint("json_schema", json.dumps(fn.get("parameters") or {}), "tools").grammar()
            except ConstraintError as e:
                raise ParamError(f"tools: the parameters of function {fn['name']!r} are not a JSON schema this server "
                                 f"can enforce: {str(e).split(': ', 2)[-1]}", param="tools") from None
        parallel = self.parallel_tool_calls is not False and choice == "required"
        constraint = Constraint("grammar", parser.grammar(tools, parallel), "tools")
        try:
            constraint.grammar()  # a tool's parameters that are not a usable JSON schema: a 400 now
        except ConstraintError as e:
            raise ParamError(f"tools: a function's parameters are not a JSON schema this server can enforce: "
                             f"{str(e).split(': ', 1)[-1]}", param="tools") from None
        return constraint

    def output_constraint(self, tool_constraint=None):
        """The constraint on the output: a forced tool call's (tool_constraint()'s), else response_format's or a
        guided_* field's; None: free text."""
        return tool_constraint or self._constraint()

    def to_sampling_params(self, default_max_tokens: int, defaults: Optional[dict] = None,
                           seed_offset: int = 0, constraint=None,
                           keep_special_tokens: bool = False) -> SamplingParams:
        """`default_max_tokens` (the rest of the context, or the server's default) applies when the request
        sets none. `constraint`: output_constraint()'s (None: the request's own); `keep_special_tokens`: a parser
        reads a special token (mistral's [TOOL_CALLS], a <think> tag that is one), so it stays in the text."""
        max_tokens = self.requested_max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self._sampling_params(max_tokens, logprobs, defaults, seed_offset, constraint=constraint)
        if keep_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)
        return params


# -- responses --------------------------------------------------------------------------------------
