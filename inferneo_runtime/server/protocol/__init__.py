"""OpenAI-compatible request and response models (pydantic).

Request fields follow the order of OpenAI's API reference:
  https://platform.openai.com/docs/api-reference/completions/create
  https://platform.openai.com/docs/api-reference/chat/create
Inferneo's extensions (vLLM's names) sit after them in one marked block. Unknown fields are accepted and
logged, since clients send fields a server does not implement; OpenAI fields this server cannot honour
(suffix, best_of other than n) are rejected with a 400.

Modules: common (field errors, the base model, sampling fields), requests (completions and chat bodies),
responses (their answers and chunks), service (cards, errors, tokenize, embeddings, management bodies); every
public name is importable from this package.

A request turns itself into SamplingParams with one precedence: the request's value, else the server's
default, else the OpenAI API default (`to_sampling_params`).
"""
# ruff: noqa: F401 - the package re-exports its modules' names
from .common import (API_DEFAULTS, COMPLETIONS_DEFAULT_MAX_TOKENS, MAX_MESSAGES, MODEL_HELP, OpenAIBaseModel,
                     ParamError, ShortText, StreamOptions, TokenId)  # noqa: F401
from .requests import (TOOL_CHOICES, ChatCompletionRequest, ChatMessage, ChatTool, CompletionRequest, ContentPart,
                       FunctionCall, FunctionDefinition, MessageToolCall, ResponseFormat)  # noqa: F401
from .responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatTokenLogprob,
                        ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse,
                        CompletionTokensDetails, PromptLogprob, ResponseMessage, ResponseToolCall, ToolCallFunction,
                        TopLogprob, UsageInfo)  # noqa: F401
from .service import (ABTestRequest, DetokenizeRequest, DetokenizeResponse, Embedding, EmbeddingRequest,
                      EmbeddingResponse, EmbeddingUsage, ErrorInfo, ErrorResponse, ModelCard, ModelList, ModelPath,
                      RegisterModelRequest, RoutingRuleRequest, TokenizeChatRequest, TokenizeCompletionRequest,
                      TokenizeResponse)  # noqa: F401
