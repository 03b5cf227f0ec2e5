"""A Python client for `inferneo serve`: the official `openai` client for the OpenAI calls, Inferneo's own calls
(model management, routing, A/B tests) beside them, and one set of typed errors for both.

    from inferneo_runtime.client import InferneoClient, ModelNotFoundError, OverloadedError

    client = InferneoClient("http://localhost:8000")
    r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=16)
    print(r.choices[0].message.content, r.usage.completion_tokens)
    for chunk in client.completions.create(model="smollm2-135m", prompt="Once", stream=True):
        print(chunk.choices[0].text, end="")
    info = client.models.get("smollm2-135m")          # .format, .parameters, .dtype, .version, .memory, ...
    client.models.register("qwen", "artifacts/qwen2-0.5b", version="2")   # management API (loopback / token)

    async with AsyncInferneoClient("http://localhost:8000") as client:   # the same calls, awaited
        r = await client.completions.create(model="smollm2-135m", prompt="Once", max_tokens=8)

Completions, chat, embeddings and the model list are openai's own calls and objects (its retries, timeouts,
streaming and types); `model` may be left out, for the server to route the request. Every failure raises an
InferneoError subclass chosen from the server's status and error code, instead of openai's classes:

    ModelNotFoundError   404 model_not_found        InvalidFormatError  400 invalid_format (registering)
    BadRequestError      400 (others; .param names the field)   RequestTooLargeError 413
    OverloadedError      429 queue_full / overloaded / too_many_streams, 503 shutting_down
    OutOfMemoryError     503 out_of_memory          PermissionDeniedError 403    ConflictError 409
    ServerError          5xx otherwise              ConnectionError     the server cannot be reached

A streamed answer that fails after it started raises the same classes from the iterator. Needs the `client`
extra (openai, httpx).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .errors import InferneoError

try:
    import httpx
    import openai
except ImportError as e:  # pragma: no cover - depends on the install
    from .errors import MissingExtraError

    raise MissingExtraError("inferneo_runtime.client", "client", e.name or "openai") from None

__all__ = ["InferneoClient", "AsyncInferneoClient", "APIError", "ModelNotFoundError", "OutOfMemoryError",
           "InvalidFormatError", "BadRequestError", "RequestTooLargeError", "OverloadedError", "PermissionDeniedError",
           "ConflictError", "ServerError", "ConnectionError", "Obj"]


# -- errors -----------------------------------------------------------------------------------------------
class APIError(InferneoError):
    """An error answer from the server (or no answer). `status`, `code`, `param`, `body` as the server sent."""

    prefix = "error"

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[str] = None,
                 param: Optional[str] = None, body: Optional[dict] = None):
        text = message if message.lower().startswith(self.prefix) else f"{self.prefix}: {message}"
        super().__init__(text)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.body = body or {}


class BadRequestError(APIError):
    prefix = "bad request"


class ModelNotFoundError(APIError):
    prefix = "model not found"


class InvalidFormatError(BadRequestError):
    prefix = "invalid format"


class RequestTooLargeError(BadRequestError):
    prefix = "request too large"


class OverloadedError(APIError):
    prefix = "overloaded"


class OutOfMemoryError(APIError):
    prefix = "out of memory"


class PermissionDeniedError(APIError):
    prefix = "permission denied"


class ConflictError(APIError):
    prefix = "conflict"


class ServerError(APIError):
    prefix = "server error"


class ConnectionError(APIError):  # noqa: A001 - the client's own, an APIError like the others
    prefix = "connection error"


_BY_CODE = {"model_not_found": ModelNotFoundError, "invalid_format": InvalidFormatError,
            "out_of_memory": OutOfMemoryError, "queue_full": OverloadedError, "overloaded": OverloadedError,
            "too_many_streams": OverloadedError, "shutting_down": OverloadedError,
            "request_too_large": RequestTooLargeError, "forbidden": PermissionDeniedError,
            "conflict": ConflictError, "model_busy": ConflictError}
_BY_STATUS = {400: BadRequestError, 403: PermissionDeniedError, 404: ModelNotFoundError, 409: ConflictError,
              413: RequestTooLargeError, 422: BadRequestError, 429: OverloadedError}


def error_from(status: int, payload: Any) -> APIError:
    """The exception for an error answer: by the server's error code, else by HTTP status."""
    info = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(info, dict):
        info = {"message": str(payload)[:500] if payload else f"HTTP {status}"}
    code = info.get("code")
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
        if status == 404 and info.get("param") != "model":
            cls = APIError  # a 404 that is not about a model (unknown path, A/B test)
    return cls(str(info.get("message") or f"HTTP {status}"), status=status, code=code, param=info.get("param"),
               body=info)


# -- responses ---------------------------------------------------------------------------------------------
class Obj:
    """Attribute access over a JSON object (nested objects and lists too); missing attributes are None."""

    def __init__(self, data: dict):
        self._data = data

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _wrap(self._data.get(name))

    def __getitem__(self, key):
        return _wrap(self._data[key])

    def __contains__(self, key) -> bool:
        return key in self._data

    def __eq__(self, other) -> bool:
        return isinstance(other, Obj) and other._data == self._data

    def get(self, key, default=None):
        return _wrap(self._data.get(key, default))

    def to_dict(self) -> dict:
        return self._data

    model_dump = to_dict  # the name openai's objects use

    def __repr__(self) -> str:
        return f"Obj({json.dumps(self._data)[:300]})"


def _wrap(value):
    if isinstance(value, dict):
        return Obj(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


# -- from openai's errors to ours ---------------------------------------------------------------------------
STREAM_ERROR_STATUS = {"out_of_memory": 503, "shutting_down": 503}  # an error event has no HTTP status of its own


def translate(e: Exception) -> Exception:
    """Our exception for one of openai's (others are returned as they are)."""
    if isinstance(e, openai.APIConnectionError):
        return ConnectionError(f"{e.request.url if e.request else ''}: {e.__cause__ or e}")
    if not isinstance(e, openai.APIError):
        return e
    body = e.body if isinstance(e.body, dict) else {"message": e.message}
    # an error event in a stream that had started has no HTTP status of its own
    status = e.status_code if isinstance(e, openai.APIStatusError) else STREAM_ERROR_STATUS.get(body.get("code"), 500)
    return error_from(status, {"error": body})


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except openai.OpenAIError as e:
        raise translate(e) from None


class _Stream:
    """openai's stream, raising our errors; iterate it (and close it, or use `with`, to stop early)."""

    def __init__(self, stream: "openai.Stream"):
        self._stream = stream
        self.headers = stream.response.headers

    def __iter__(self) -> Iterator[Any]:
        with _translated():
            yield from self._stream

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncStream(_Stream):
    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        with _translated():
            async for chunk in self._stream:
                yield chunk

    async def close(self) -> None:
        await self._stream.close()

    async def __aenter__(self) -> "_AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _create_kwargs(headers: Optional[dict], kwargs: dict) -> dict:
    """openai's create() arguments: extra headers merged, and a model even when none was given (the server routes a
    request with model "auto"; openai's signature requires the argument)."""
    if headers:
        kwargs = {**kwargs, "extra_headers": {**kwargs.get("extra_headers", {}), **headers}}
    return {**kwargs, "model": kwargs.get("model") or "auto"}


class _Creates:
    """One of openai's resources (completions, chat.completions, embeddings): its create(), raising our errors."""

    def __init__(self, resource):
        self._resource = resource

    def create(self, headers: Optional[dict] = None, **kwargs):
        """openai's create (model may be left out: the server routes it); stream=True yields chunks."""
        with _translated():
            result = self._resource.create(**_create_kwargs(headers, kwargs))
        return _Stream(result) if isinstance(result, openai.Stream) else result


class _AsyncCreates(_Creates):
    async def create(self, headers: Optional[dict] = None, **kwargs):
        with _translated():
            result = await self._resource.create(**_create_kwargs(headers, kwargs))
        return _AsyncStream(result) if isinstance(result, openai.AsyncStream) else result


class _Chat:
    def __init__(self, chat, creates=_Creates):
        self.completions = creates(chat.completions)


class _Admin:
    """Inferneo's own endpoints (model management, routing) through openai's client (its documented way to call
    endpoints it has no method for): JSON in, Obj out."""

    def __init__(self, client: "openai.OpenAI"):
        self._client = client

    def call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        send = getattr(self._client, method)
        with _translated():
            return _wrap(send(path, cast_to=object, **({} if body is None else {"body": body})))


class _Models:
    def __init__(self, admin: _Admin):
        self._admin = admin

    def list(self) -> Obj:
        return self._admin.call("get", "/models")

    def get(self, model_id: str) -> Obj:
        return self._admin.call("get", f"/models/{model_id}")

    retrieve = get  # openai's name

    def register(self, name: Optional[str], path: str, *, version: Optional[str] = None, format: Optional[str] = None,
                 load: bool = False, **fields) -> Obj:
        body = {"name": name, "path": str(path), "version": version, "format": format, "load": load, **fields}
        return self._admin.call("post", "/models", {k: v for k, v in body.items() if v is not None})

    def load(self, model_id: str) -> Obj:
        return self._admin.call("post", f"/models/{model_id}/load", {})  # the server takes JSON only

    def unload(self, model_id: str) -> Obj:
        return self._admin.call("post", f"/models/{model_id}/unload", {})

    def delete(self, model_id: str) -> Obj:
        return self._admin.call("delete", f"/models/{model_id}")


class _Routing:
    def __init__(self, admin: _Admin):
        self._admin = admin

    def get(self) -> Obj:
        return self._admin.call("get", "/routing")

    def add_rule(self, name: str, condition, model: str, priority: int = 0) -> Obj:
        return self._admin.call("post", "/routing/rules", {"name": name, "condition": condition, "model": model,
                                                           "priority": priority})

    def delete_rule(self, name: str) -> Obj:
        return self._admin.call("delete", f"/routing/rules/{name}")

    def add_ab_test(self, name: str, model_a: str, model_b: str, traffic_split: float = 0.5,
                    sticky: str = "user") -> Obj:
        return self._admin.call("post", "/ab_tests", {"name": name, "model_a": model_a, "model_b": model_b,
                                                      "traffic_split": traffic_split, "sticky": sticky})

    def ab_test(self, name: str) -> Obj:
        return self._admin.call("get", f"/ab_tests/{name}")

    def delete_ab_test(self, name: str) -> Obj:
        return self._admin.call("delete", f"/ab_tests/{name}")


def _openai_settings(base_url: str, api_key: Optional[str], timeout: float, headers: Optional[dict],
                     max_retries: int) -> tuple[str, dict]:
    base = base_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    # openai always sends a bearer token; a server without --api-key ignores this placeholder
    return base, dict(base_url=f"{base}/v1", api_key=api_key or "none", timeout=timeout, default_headers=headers,
                      max_retries=max_retries)


class InferneoClient:
    """Client for one Inferneo server. `base_url` with or without the /v1 suffix; `api_key` is sent as the
    bearer token (the server's --api-key, or its admin token for the management calls). `max_retries`: openai's
    retries of connection errors, 429 and 5xx answers (0 by default: a 429 is reported, not waited out)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 600.0, headers: Optional[dict] = None, max_retries: int = 0):
        self.base_url, settings = _openai_settings(base_url, api_key, timeout, headers, max_retries)
        self.openai = openai.OpenAI(**settings)  # the official client, for anything not wrapped here
        self.chat = _Chat(self.openai.chat)
        self.completions = _Creates(self.openai.completions)
        self.embeddings = _Creates(self.openai.embeddings)
        admin = _Admin(self.openai)
        self.models = _Models(admin)
        self.routing = _Routing(admin)

    def health(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.openai.close()

    def __enter__(self) -> "InferneoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncInferneoClient:
    """InferneoClient's OpenAI calls for asyncio code (each awaited; a stream is iterated with `async for`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 600.0, headers: Optional[dict] = None, max_retries: int = 0):
        self.base_url, settings = _openai_settings(base_url, api_key, timeout, headers, max_retries)
        self.openai = openai.AsyncOpenAI(**settings)
        self.chat = _Chat(self.openai.chat, _AsyncCreates)
        self.completions = _AsyncCreates(self.openai.completions)
        self.embeddings = _AsyncCreates(self.openai.embeddings)

    async def close(self) -> None:
        await self.openai.close()

    async def __aenter__(self) -> "AsyncInferneoClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
