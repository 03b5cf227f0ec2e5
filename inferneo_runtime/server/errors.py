"""Exceptions as OpenAI-shaped HTTP errors: each class maps to its status, error type and code by lookup
(`STATUS`, searched along the exception's class hierarchy), and the app's exception handlers use it."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..drivers import DriverStopped
from ..errors import InferneoError, MissingExtraError, RequestError, S3Error, first_problem, pydantic_problem
from ..registry import CapacityError, ModelBusy, ModelNotFound, RegistryError
from ..signing import SignatureError
from .admin_guard import AdminForbidden, MisdirectedHost, NotJSON
from .protocol import ErrorInfo, ErrorResponse
from .routing import RoutingError

logger = logging.getLogger("inferneo.server")

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat",  # path -> metrics label
             "/v1/responses": "responses"}
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid request (OpenAI's shape; `param` names the field)"), (404, "unknown model"),
    (413, "request body too large"), (429, "overloaded: queue full, too many requests or streams"),
    (503, "out of memory, or shutting down"))}
ADMIN_RESPONSES = {**ERROR_RESPONSES, 403: {"model": ErrorResponse, "description": "not allowed"},
                   409: {"model": ErrorResponse, "description": "conflict: exists already, or busy"},
                   415: {"model": ErrorResponse, "description": "not a JSON body"},
                   421: {"model": ErrorResponse, "description": "Host not served (DNS rebinding)"}}


class QueueFull(InferneoError):
    """max_queue sequences are already in flight."""


class Overloaded(InferneoError):
    """max_concurrent_requests generation requests are already in flight."""


class TooManyStreams(InferneoError):
    """The client already has max_streams_per_client streams open."""


class TooManySequences(InferneoError):
    """The client already has max_sequences_per_client sequences in flight."""


class ClientGone(InferneoError):
    """The client closed its connection before a non-streaming answer was ready; its sequences were cancelled."""


# exception class -> (HTTP status, OpenAI error type, code); the most derived class listed wins
STATUS: dict[type, tuple[int, str, str]] = {
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    ClientGone: (499, "invalid_request_error", "client_closed_request"),
    QueueFull: (429, "rate_limit_error", "queue_full"),
    Overloaded: (429, "rate_limit_error", "overloaded"),
    TooManyStreams: (429, "rate_limit_error", "too_many_streams"),
    TooManySequences: (429, "rate_limit_error", "too_many_sequences"),
    AdminForbidden: (403, "permission_error", "forbidden"),
    MisdirectedHost: (421, "permission_error", "misdirected_host"),
    NotJSON: (415, "invalid_request_error", "unsupported_media_type"),
    ModelBusy: (409, "invalid_request_error", "model_busy"),
    RegistryError: (409, "invalid_request_error", "conflict"),
    CapacityError: (503, "service_unavailable", "out_of_memory"),
    MemoryError: (503, "service_unavailable", "out_of_memory"),
    DriverStopped: (503, "service_unavailable", "shutting_down"),
}
# a RoutingError's own code picks its status; other routing codes are 400s like any RequestError
ROUTING_STATUS = {"not_found": 404, "conflict": 409}
# what went wrong registering a model over the API (the caller's 400), by class; else "invalid_format"
REGISTRATION_CODES = {MissingExtraError: "missing_extra", SignatureError: "untrusted_artifact", S3Error: "s3_error"}
OUT_OF_MEMORY_TEXT = ("out of memory", "failed to allocate", "bad_alloc", "bad allocation")


def _lookup(table: dict, e: BaseException):
    return next((table[cls] for cls in type(e).__mro__ if cls in table), None)


def _is_out_of_memory(e: BaseException) -> bool:  # a backend's allocation failure, whatever its class
    return any(s in str(e).lower() for s in OUT_OF_MEMORY_TEXT)


def error_info(e: BaseException) -> tuple[int, ErrorInfo]:
    """The HTTP status and OpenAI error object for an exception."""
    if isinstance(e, RoutingError) and e.code in ROUTING_STATUS:
        return ROUTING_STATUS[e.code], ErrorInfo(message=str(e), type="invalid_request_error", code=e.code)
    known = _lookup(STATUS, e)
    if known is None and isinstance(e, RequestError):
        return 400, ErrorInfo(message=str(e), type="invalid_request_error", param=getattr(e, "param", None),
                              code=getattr(e, "code", None))
    if known is None and _is_out_of_memory(e):
        known = STATUS[MemoryError]
    if known is not None:
        status, kind, code = known
        message = str(e)
        if code == "out_of_memory" and not isinstance(e, CapacityError):
            message = f"out of memory: {e or type(e).__name__}; retry later"
        return status, ErrorInfo(message=message, type=kind, code=code)
    if isinstance(e, InferneoError):
        return 500, ErrorInfo(message=str(e), type="server_error", code=type(e).__name__)
    return 500, ErrorInfo(message=f"internal error: {type(e).__name__}: {e}", type="server_error")


def registration_error(e: BaseException) -> tuple[int, ErrorInfo]:
    """Errors of registering a model over the API: what is wrong with the model given is the caller's 400."""
    if isinstance(e, RegistryError):
        return error_info(e)
    code = _lookup(REGISTRATION_CODES, e) or "invalid_format"
    text = first_problem(e)
    return 400, ErrorInfo(message=f"invalid format: {text}" if code == "invalid_format" else text,
                          type="invalid_request_error", param="path", code=code)


def error_response(status: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def add_error_handlers(app: FastAPI, count_refused) -> None:
    """Answer every error in OpenAI's shape. `count_refused(path, status)` records a refused generation request
    in the metrics (a body that failed validation never reaches the endpoint)."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        count_refused(request.url.path, 400)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            msg = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return error_response(400, ErrorInfo(message=msg, type="invalid_request_error", code="invalid_json"))
        param = ".".join(str(p) for p in pydantic_problem(exc)[0]) if exc.errors() else None
        return error_response(400, ErrorInfo(message=first_problem(exc) if exc.errors() else "invalid request",
                                             type="invalid_request_error", param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = {413: "request_too_large", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, ErrorInfo(message=str(exc.detail), type=kind, code=code))

    @app.exception_handler(InferneoError)
    @app.exception_handler(MemoryError)
    @app.exception_handler(Exception)  # (Starlette re-raises these after answering, so they are logged)
    async def _error(request: Request, exc: Exception):
        status, info = error_info(exc)
        if status >= 500 and status != 503:
            logger.exception("request failed", exc_info=exc)
        return error_response(status, info)
