"""ASGI middleware in front of every route: 503 while draining, and the API key on the inference endpoints."""
from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from .config import ServerConfig
from .errors import ENDPOINTS, error_response
from .jobs import Call
from .protocol import ErrorInfo

if TYPE_CHECKING:
    from .state import ServerState


class RefuseWhileDraining:
    """From SIGTERM on, new requests get 503 (with Connection: close, so clients reconnect elsewhere); probes and
    metrics still answer. Requests already running are not affected."""

    OPEN = ("/health", "/ready", "/metrics")

    def __init__(self, app, state: "ServerState"):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.state.shutting_down or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        endpoint = ENDPOINTS.get(scope["path"])
        if endpoint:
            Call(self.state, endpoint).finish(503)
        response = error_response(503, ErrorInfo(message="the server is shutting down; retry on another replica",
                                                 type="service_unavailable", code="shutting_down"))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class RequireAPIKey:
    """With an API key set (--api-key, INFERNEO_API_KEY), the inference endpoints answer only requests bearing it
    (or the admin token, the stronger credential); else 401 in OpenAI's shape. Probes, /metrics, /version and the
    management endpoints (which the admin guard keeps) are not affected. A middleware, so nothing of an
    unauthenticated request is parsed."""

    PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize")

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.keys = [f"Bearer {k}".encode() for k in (config.api_key, config.admin_token) if k]
        self.on = bool(config.api_key)

    def guarded(self, scope) -> bool:
        path = scope["path"]
        # GET /v1/models and /v1/models/{id} list the served models; their POST/DELETE are the admin guard's
        return path in self.PATHS or (path.startswith("/v1/models") and scope["method"] in ("GET", "HEAD"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.on or not self.guarded(scope):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        ok = False
        for key in self.keys:  # constant time for each; every key is compared
            ok |= hmac.compare_digest(given, key)
        if ok:
            return await self.app(scope, receive, send)
        message = ("missing API key: send `Authorization: Bearer <key>`" if not given else
                   "incorrect API key provided")
        response = error_response(401, ErrorInfo(message=message, type="invalid_request_error",
                                                 code="invalid_api_key"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
