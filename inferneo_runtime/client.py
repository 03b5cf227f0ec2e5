"""A small Python client for `inferneo serve`: the OpenAI-style calls plus Inferneo's own, with typed errors.

    from inferneo_runtime.client import InferneoClient, ModelNotFoundError, OverloadedError

    client = InferneoClient("http://localhost:8000")
    r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=16)
    print(r.choices[0].message.content, r.usage.completion_tokens)
    for chunk in client.completions.create(model="smollm2-135m", prompt="Once", stream=True):
        print(chunk.choices[0].text, end="")
    info = client.models.get("smollm2-135m")          # .format, .parameters, .dtype, .version, .memory, ...
    client.models.register("qwen", "artifacts/qwen2-0.5b", version="2")   # management API (loopback / token)

Responses are objects with attribute access over the JSON (`.to_dict()` gives the JSON back). Every failure
raises an InferneoError subclass chosen from the server's status and error code:

    ModelNotFoundError   404 model_not_found        InvalidFormatError  400 invalid_format (registering)
    BadRequestError      400 (others; .param names the field)   RequestTooLargeError 413
    OverloadedError      429 queue_full / overloaded / too_many_streams, 503 shutting_down
    OutOfMemoryError     503 out_of_memory          PermissionDeniedError 403    ConflictError 409
    ServerError          5xx otherwise              ConnectionError     the server cannot be reached

A streamed answer that fails after it started raises the same classes from the iterator. Needs httpx (the
`serve` or `client` extra); the openai package is not used.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from .errors import InferneoError

try:
    import httpx
except ImportError:  # pragma: no cover - depends on the install
    from .errors import MissingExtraError

    raise MissingExtraError("inferneo_runtime.client", "client", "httpx") from None

__all__ = ["InferneoClient", "APIError", "ModelNotFoundError", "OutOfMemoryError", "InvalidFormatError",
           "BadRequestError", "RequestTooLargeError", "OverloadedError", "PermissionDeniedError", "ConflictError",
           "ServerError", "ConnectionError", "Obj"]


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


class Stream:
    """Server-sent events as objects; iterate it (and close it, or use `with`, to stop early)."""

    def __init__(self, client: "InferneoClient", response: httpx.Response, context):
        self._response = response
        self._context = context
        self.headers = response.headers

    def __iter__(self) -> Iterator[Obj]:
        try:
            for line in self._response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                payload = json.loads(data)
                if isinstance(payload, dict) and "error" in payload:
                    info = payload["error"] if isinstance(payload["error"], dict) else {}
                    status = {"out_of_memory": 503, "shutting_down": 503}.get(info.get("code"), 500)
                    raise error_from(status, payload)
                yield Obj(payload)
        finally:
            self.close()

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the client --------------------------------------------------------------------------------------------
def _body(kwargs: dict) -> dict:
    extra = kwargs.pop("extra_body", None) or {}
    return {**{k: v for k, v in kwargs.items() if v is not None}, **extra}


class _Completions:
    def __init__(self, client: "InferneoClient", path: str):
        self._client, self._path = client, path

    def create(self, *, stream: bool = False, headers: Optional[dict] = None, **kwargs):
        """POST with OpenAI's fields (model may be omitted: the server routes it); stream=True yields chunks."""
        body = _body(kwargs)
        if stream:
            body["stream"] = True
            return self._client._stream(self._path, body, headers)
        return self._client._request("POST", self._path, json=body, headers=headers)


class _Chat:
    def __init__(self, client: "InferneoClient"):
        self.completions = _Completions(client, "/v1/chat/completions")


class _Models:
    def __init__(self, client: "InferneoClient"):
        self._client = client

    def list(self) -> Obj:
        return self._client._request("GET", "/v1/models")

    def get(self, model_id: str) -> Obj:
        return self._client._request("GET", f"/v1/models/{model_id}")

    retrieve = get  # openai's name

    def register(self, name: Optional[str], path: str, *, version: Optional[str] = None, format: Optional[str] = None,
                 load: bool = False, **fields) -> Obj:
        body = {"name": name, "path": str(path), "version": version, "format": format, "load": load, **fields}
        return self._client._request("POST", "/v1/models", json={k: v for k, v in body.items() if v is not None})

    def load(self, model_id: str) -> Obj:
        return self._client._request("POST", f"/v1/models/{model_id}/load", json={})  # the server takes JSON only

    def unload(self, model_id: str) -> Obj:
        return self._client._request("POST", f"/v1/models/{model_id}/unload", json={})

    def delete(self, model_id: str) -> Obj:
        return self._client._request("DELETE", f"/v1/models/{model_id}")


class _Routing:
    def __init__(self, client: "InferneoClient"):
        self._client = client

    def get(self) -> Obj:
        return self._client._request("GET", "/v1/routing")

    def add_rule(self, name: str, condition, model: str, priority: int = 0) -> Obj:
        return self._client._request("POST", "/v1/routing/rules", json={"name": name, "condition": condition,
                                                                         "model": model, "priority": priority})

    def delete_rule(self, name: str) -> Obj:
        return self._client._request("DELETE", f"/v1/routing/rules/{name}")

    def add_ab_test(self, name: str, model_a: str, model_b: str, traffic_split: float = 0.5,
                    sticky: str = "user") -> Obj:
        return self._client._request("POST", "/v1/ab_tests", json={"name": name, "model_a": model_a,
                                                                    "model_b": model_b, "traffic_split": traffic_split,
                                                                    "sticky": sticky})

    def ab_test(self, name: str) -> Obj:
        return self._client._request("GET", f"/v1/ab_tests/{name}")

    def delete_ab_test(self, name: str) -> Obj:
        return self._client._request("DELETE", f"/v1/ab_tests/{name}")


class InferneoClient:
    """Client for one Inferneo server. `base_url` with or without the /v1 suffix; `api_key` is sent as the
    bearer token (the server's admin token, for the management calls)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 600.0, headers: Optional[dict] = None,
                 transport: Optional[httpx.BaseTransport] = None):
        base = base_url.rstrip("/")
        base = base[:-3] if base.endswith("/v1") else base
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base, timeout=timeout, headers={**auth, **(headers or {})},
                                  transport=transport)
        self.base_url = base
        self.chat = _Chat(self)
        self.completions = _Completions(self, "/v1/completions")
        self.models = _Models(self)
        self.routing = _Routing(self)

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "InferneoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> Obj:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ConnectionError(f"{self.base_url}: {type(e).__name__}: {e}") from None
        payload = _json(r)
        if r.status_code >= 400:
            raise error_from(r.status_code, payload)
        return _wrap(payload) if isinstance(payload, (dict, list)) else payload

    def _stream(self, path: str, body: dict, headers: Optional[dict]) -> Stream:
        context = self._http.stream("POST", path, json=body, headers=headers)
        try:
            response = context.__enter__()
        except httpx.TransportError as e:
            raise ConnectionError(f"{self.base_url}: {type(e).__name__}: {e}") from None
        if response.status_code >= 400:
            response.read()
            context.__exit__(None, None, None)
            raise error_from(response.status_code, _json(response))
        return Stream(self, response, context)


def _json(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return {"error": {"message": r.text[:500] or f"HTTP {r.status_code}"}}
