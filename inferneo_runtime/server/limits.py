"""Bounds on what one request may ask of the server, so hostile or careless input gets a 4xx, never an OOM.

- Body size: `max_request_bytes`. A declared Content-Length above it is answered 413 before the body is
  read; a chunked body is counted as it arrives and cut off with 413 at the limit.
- Per request (400, naming the field and the limit): n, max_tokens, prompts per request, characters of
  prompt or messages, stop strings (count and length), stop_token_ids.
- Concurrency (429): generation requests in flight (`max_concurrent_requests`, code "overloaded") and
  streams per client address (`max_streams_per_client`, code "too_many_streams"); sequences in flight stay
  bounded by `max_queue` (code "queue_full").
"""
from __future__ import annotations

import json
import threading
from typing import Optional

from starlette.exceptions import HTTPException

from .protocol import CompletionRequest, ParamError


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds this server's limit of {limit} bytes (max_request_bytes)")


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class BodyLimit:
    """ASGI middleware: 413 for bodies over `max_bytes` (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
                if size < 0:
                    raise ValueError
            except ValueError:
                return await self._reject(send, 400, f"invalid Content-Length {declared[:40]!r}", "invalid_request")
            if size > self.max_bytes:
                return await self._reject(send, 413, f"request body of {size} bytes exceeds this server's limit of "
                                                     f"{self.max_bytes} bytes (max_request_bytes)", "request_too_large")
        received = 0
        limit = self.max_bytes

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)  # FastAPI passes HTTPExceptions from body reading through
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _reject(send, status: int, message: str, code: str) -> None:
        body = _error_body(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def check_request(body, config) -> None:
    """Raise ParamError (400) when a parsed request exceeds one of the server's per-request limits."""
    if body.n > config.max_n:
        raise ParamError(f"n={body.n} exceeds this server's limit of {config.max_n} (max_n)", param="n")
    if getattr(body, "best_of", None) is not None and body.best_of > config.max_n:
        raise ParamError(f"best_of={body.best_of} exceeds this server's limit of {config.max_n} (max_n)",
                         param="best_of")
    requested = body.max_tokens if isinstance(body, CompletionRequest) else body.requested_max_tokens
    if config.max_tokens_limit is not None and requested is not None and requested > config.max_tokens_limit:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ParamError(f"{field}={requested} exceeds this server's limit of {config.max_tokens_limit} "
                         f"(max_tokens_limit)", param=field)
    if isinstance(body, CompletionRequest):
        prompts = body.prompts()
        if len(prompts) > config.max_prompts:
            raise ParamError(f"{len(prompts)} prompts exceed this server's limit of {config.max_prompts} per request "
                             f"(max_prompts)", param="prompt")
        chars = sum(len(p) for p in prompts)
        param = "prompt"
    else:
        if len(body.messages) > config.max_messages:
            raise ParamError(f"{len(body.messages)} messages exceed this server's limit of {config.max_messages} "
                             f"(max_messages)", param="messages")
        # every string of a message counts (a 1M-character role is as much work as a 1M-character content), and
        # so do the tools and earlier tool calls, which the chat template renders too
        chars = sum(len(m.role) + len(m.name or "") + (len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text or "") + len(p.type) for p in m.content or ())) +
                    sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or ()) +
                    len(m.reasoning_text() or "") for m in body.messages)
        chars += sum(len(json.dumps(t.model_dump(exclude_none=True))) for t in getattr(body, "tools", None) or ())
        param = "messages"
    texts = [p for p in body.prompts() if isinstance(p, str)] if isinstance(body, CompletionRequest) else [
        m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or ())
        for m in body.messages]
    if not all(_is_unicode(t) for t in texts):
        raise ParamError(f"the {param} is not valid Unicode (it holds a lone surrogate escape such as \\ud800)",
                         param=param)
    if chars > config.max_prompt_chars:
        raise ParamError(f"the {param} has {chars} characters (or token ids), more than this server's limit of "
                         f"{config.max_prompt_chars} (max_prompt_chars)", param=param)
    stops = body._stops()
    if len(stops) > config.max_stop:
        raise ParamError(f"{len(stops)} stop strings exceed this server's limit of {config.max_stop} (max_stop)",
                         param="stop")
    if not all(stops):
        raise ParamError("stop strings must be non-empty", param="stop")
    long = next((s for s in stops if len(s) > config.max_stop_chars), None)
    if long is not None:
        raise ParamError(f"a stop string of {len(long)} characters exceeds this server's limit of "
                         f"{config.max_stop_chars} (max_stop_chars)", param="stop")
    if body.stop_token_ids and len(body.stop_token_ids) > config.max_stop:
        raise ParamError(f"{len(body.stop_token_ids)} stop_token_ids exceed this server's limit of {config.max_stop} "
                         f"(max_stop)", param="stop_token_ids")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ClientStreams:
    """Streaming requests open per client address."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, client: Optional[str]) -> Optional[str]:
        """Count a new stream for `client`; returns the key to close it with. Raises TooManyStreams."""
        key = client or "unknown"
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.limit:
                return None
            self._open[key] = n + 1
        return key

    def close(self, key: str) -> None:
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)

    def count(self, client: str) -> int:
        return self._open.get(client, 0)
