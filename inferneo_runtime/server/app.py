"""The FastAPI app: OpenAI-compatible endpoints over the registry's models and their engine drivers.

A request: bound the body (413 over `max_request_bytes`) → parse (pydantic; errors become OpenAI-shaped 400s)
→ check the per-request limits (n, max_tokens, prompt size, stop lists: 400) → route it (an explicit model
name goes to that model; otherwise routing rules, A/B tests, the default model; routing.py) → find the model
(404) → count a stream against its client (429 beyond `max_streams_per_client`) and the request against
`max_concurrent_requests` (429) → reserve room in the queue (429 when `max_queue` sequences are already in
flight) → lease the model (loading it, or 503 when it cannot fit the budget) → tokenize and check the
context bound (400 naming the numbers) → submit one ticket per sequence (n per prompt, seed + i) to the
model's driver → await TokenEvents on an asyncio.Queue fed from the driver thread with
loop.call_soon_threadsafe → answer, or stream server-sent events ending in `data: [DONE]`. Everything taken
is given back when the answer ends; a streaming client that disconnects cancels its tickets, which frees
their engine slots at the next step.

Validation errors are mapped to 400 (OpenAI answers bad parameters with 400, and so do the openai
clients' BadRequestError), not FastAPI's default 422. Management endpoints (register / load / unload /
unregister models, routing rules, A/B tests) are guarded by admin_guard.py (Host allow-list, Origin, JSON
bodies, the admin token or a loopback peer); what they may register, by registration_policy.py.

Lifecycle (run_server): the port opens at once (/health answers) while the models load and warm up on a
thread; /ready answers 200 only after that. On SIGTERM the server drains (DrainingServer): /ready and new
requests get 503, running requests and streams finish (for up to `graceful_timeout_s`, --drain-timeout; then
they end with a 503), the port closes, the engines stop and the process exits 0.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Callable, Optional

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InferneoError, MissingExtraError, RequestError
from ..generation import TokenEvent
from ..registry import CapacityError, Entry, Lease, ModelBusy, ModelNotFound, ModelRegistry, RegistryError
from ..sampling import SamplingParams, TokenLogprobs
from .admin_guard import AdminForbidden, AdminGuard, MisdirectedHost, NotJSON, binds_loopback
from .config import ModelConfig, ServerConfig, artifacts_to_serve, read_chat_template
from ..drivers import Cancelled, DriverStopped
from .limits import BodyLimit, ClientStreams, check_request
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ABTestRequest, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatTokenLogprob, ChoiceLogprobs, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, Embedding,
                       EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, ErrorInfo, ErrorResponse, ModelCard,
                       ModelList, ParamError, RegisterModelRequest, ResponseMessage, RoutingRuleRequest,
                       TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse, TopLogprob, UsageInfo)
from .registration_policy import RegistrationRefused, check_registration
from .routing import Route, RouteContext, Router, RoutingError

logger = logging.getLogger("inferneo.server")

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # path -> metrics label
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid request (OpenAI's shape; `param` names the field)"), (404, "unknown model"),
    (413, "request body too large"), (429, "overloaded: queue full, too many requests or streams"),
    (503, "out of memory, or shutting down"))}
ADMIN_RESPONSES = {**ERROR_RESPONSES, 403: {"model": ErrorResponse, "description": "not allowed"},
                   409: {"model": ErrorResponse, "description": "conflict: exists already, or busy"},
                   415: {"model": ErrorResponse, "description": "not a JSON body"},
                   421: {"model": ErrorResponse, "description": "Host not served (DNS rebinding)"}}
# what a model card says only to admins: where the model came from and how its load failed
ADMIN_ONLY_FIELDS = ("source", "notes", "adapters", "model_class")


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


# -- errors ---------------------------------------------------------------------------------------------
def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or any(s in text for s in ("out of memory", "failed to allocate", "bad_alloc",
                                                                 "bad allocation"))


def error_info(e: BaseException) -> tuple[int, ErrorInfo]:
    """The HTTP status and OpenAI error object for an exception."""
    if isinstance(e, ModelNotFound):
        return 404, ErrorInfo(message=str(e), type="invalid_request_error", param="model", code="model_not_found")
    if isinstance(e, RoutingError) and e.code in ("not_found", "conflict"):
        return (404 if e.code == "not_found" else 409), ErrorInfo(message=str(e), type="invalid_request_error",
                                                                   code=e.code)
    if isinstance(e, RequestError):
        return 400, ErrorInfo(message=str(e), type="invalid_request_error", param=getattr(e, "param", None),
                              code=getattr(e, "code", None))
    if isinstance(e, ClientGone):
        return 499, ErrorInfo(message=str(e), type="invalid_request_error", code="client_closed_request")
    if isinstance(e, (QueueFull, Overloaded, TooManyStreams, TooManySequences)):
        code = {QueueFull: "queue_full", Overloaded: "overloaded", TooManyStreams: "too_many_streams",
                TooManySequences: "too_many_sequences"}[type(e)]
        return 429, ErrorInfo(message=str(e), type="rate_limit_error", code=code)
    if isinstance(e, AdminForbidden):
        return 403, ErrorInfo(message=str(e), type="permission_error", code="forbidden")
    if isinstance(e, MisdirectedHost):
        return 421, ErrorInfo(message=str(e), type="permission_error", code="misdirected_host")
    if isinstance(e, NotJSON):
        return 415, ErrorInfo(message=str(e), type="invalid_request_error", code="unsupported_media_type")
    if isinstance(e, ModelBusy):
        return 409, ErrorInfo(message=str(e), type="invalid_request_error", code="model_busy")
    if isinstance(e, RegistryError):
        return 409, ErrorInfo(message=str(e), type="invalid_request_error", code="conflict")
    if isinstance(e, CapacityError) or _is_out_of_memory(e):
        msg = str(e) if isinstance(e, CapacityError) else f"out of memory: {e or type(e).__name__}; retry later"
        return 503, ErrorInfo(message=msg, type="service_unavailable", code="out_of_memory")
    if isinstance(e, DriverStopped):
        return 503, ErrorInfo(message=str(e), type="service_unavailable", code="shutting_down")
    if isinstance(e, InferneoError):
        return 500, ErrorInfo(message=str(e), type="server_error", code=type(e).__name__)
    return 500, ErrorInfo(message=f"internal error: {type(e).__name__}: {e}", type="server_error")


def registration_error(e: BaseException) -> tuple[int, ErrorInfo]:
    """Errors of registering a model over the API: what is wrong with the model given is the caller's 400."""
    if isinstance(e, RegistryError):
        return error_info(e)
    code = ("missing_extra" if isinstance(e, MissingExtraError) else
            "untrusted_artifact" if type(e).__name__ == "SignatureError" else
            "s3_error" if type(e).__name__ == "S3Error" else "invalid_format")
    text = str(e)
    if callable(getattr(e, "errors", None)):  # pydantic: the first problem, in one line
        first = e.errors()[0]
        text = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg'].removeprefix('Value error, ')}"
    return 400, ErrorInfo(message=f"invalid format: {text}" if code == "invalid_format" else text,
                          type="invalid_request_error", param="path", code=code)


def error_response(status: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def _sse(payload) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


# -- per-request bookkeeping ------------------------------------------------------------------------------
class _Call:
    """One HTTP request's metrics: counted once, with its final status (and its A/B arm's, when it has one)."""

    def __init__(self, state: "ServerState", endpoint: str):
        self.state = state
        self.metrics = state.metrics
        self.endpoint = endpoint
        self.model = ""  # a registered model's name once known (unknown names are not used as labels)
        self.route: Optional[Route] = None
        self.started = time.perf_counter()
        self.first_token: Optional[float] = None
        self.tokens = 0
        self.done = False

    def token(self) -> None:
        self.tokens += 1
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.ttft.labels(self.model).observe(self.first_token - self.started)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        latency = time.perf_counter() - self.started
        self.metrics.requests.labels(self.model, self.endpoint, str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(self.model, self.endpoint).observe(latency)
        route = self.route
        if route is not None and route.ab_test:
            m = self.metrics
            m.ab_requests.labels(route.ab_test, route.arm, self.model, str(status)).inc()
            if status == 200:
                m.ab_latency.labels(route.ab_test, route.arm).observe(latency)
                m.ab_tokens.labels(route.ab_test, route.arm).inc(self.tokens)
            ttft = None if self.first_token is None else self.first_token - self.started
            self.state.router.record(route, status == 200, latency, ttft, self.tokens)


@dataclass
class _Seq:
    """One choice's output, accumulated from its TokenEvents on the event-loop side."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None


class _Job:
    """One HTTP request's sequences on one leased model, and the queue their events arrive on. It owns what
    the request took (lease, queue room, request and stream slots) and gives it all back on close."""

    def __init__(self, state: "ServerState", call: _Call, lease: Lease, reserved: int, held: "_Held"):
        self.state = state
        self.call = call
        self.lease = lease
        self.reserved = reserved
        self.held = held
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets = []
        self.seqs: list[_Seq] = []
        self.prompt_tokens = 0
        self.closed = False
        state.jobs.add(self)

    @property
    def driver(self):
        return self.lease.driver

    @property
    def tokenizer(self):
        return self.lease.model.tokenizer

    def _sink(self, index: int, item) -> None:  # called on the driver thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Called on a worker thread (ServerState._prepare_off_loop); the job may be closed meanwhile (the client
        gave up, the time budget ran out): a ticket submitted after its close is cancelled at once."""
        if self.closed:
            return
        self.state.metrics.prompt_tokens.labels(self.call.model).inc(self.prompt_tokens)
        for ids, p in zip(prompts, params):
            self.seqs.append(_Seq())
            self.tickets.append(self.driver.submit(ids, p, partial(self._sink, len(self.tickets))))
            if self.closed:  # close() ran while this ticket was being added: it may not have seen it
                self.driver.cancel(self.tickets[-1])

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Each TokenEvent (with its choice index) until every sequence has finished; raises a sequence's error."""
        remaining = len(self.tickets)
        metrics, model = self.state.metrics, self.call.model
        while remaining:
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            self.call.token()
            metrics.generation_tokens.labels(model).inc()
            seq = self.seqs[index]
            seq.text += item.text
            seq.token_ids.append(item.token_id)
            if item.logprobs is not None:
                seq.logprobs.append(item.logprobs)
            if item.finish_reason is not None:
                seq.finish_reason = item.finish_reason
                remaining -= 1
            yield index, item

    def usage(self) -> UsageInfo:
        completion = sum(len(s.token_ids) for s in self.seqs)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)

    def abort(self, error: Exception) -> None:
        """End the request with `error` (its stream with an error event) at its next event wait."""
        self.queue.put_nowait((0, error))

    def close(self) -> None:
        """Cancel unfinished sequences, give back the lease, the queue room and the slots. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.state.jobs.discard(self)
        for t in self.tickets:
            self.driver.cancel(t)
        self.lease.release()
        self.state.in_flight -= self.reserved
        self.held.release()


class _Held:
    """A request's request slot and stream slot, given back once."""

    def __init__(self, state: "ServerState"):
        self.state = state
        self.request = False
        self.stream_key: Optional[str] = None
        self.client: Optional[str] = None  # whose sequences `sequences` counts
        self.sequences = 0

    def release(self) -> None:
        if self.request:
            self.request = False
            self.state.requests_in_flight -= 1
        if self.sequences:
            left = self.state.client_sequences.get(self.client, 0) - self.sequences
            if left > 0:
                self.state.client_sequences[self.client] = left
            else:
                self.state.client_sequences.pop(self.client, None)
            self.sequences = 0
        if self.stream_key is not None:
            self.state.streams.close(self.stream_key)
            self.stream_key = None


class _EventStream(StreamingResponse):
    """Server-sent events that stop (cancelling the generator) when the client disconnects, whatever the
    ASGI spec version, and that always run `on_close` at the end."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None], headers: Optional[dict] = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


class _RefuseWhileDraining:
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
            _Call(self.state, endpoint).finish(503)
        response = error_response(503, ErrorInfo(message="the server is shutting down; retry on another replica",
                                                 type="service_unavailable", code="shutting_down"))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class _RequireAPIKey:
    """With an API key set (--api-key, INFERNEO_API_KEY), the inference endpoints answer only requests bearing it
    (or the admin token, the stronger credential); else 401 in OpenAI's shape. Probes, /metrics, /version and the
    management endpoints (which the admin guard keeps) are not affected. A middleware, so nothing of an
    unauthenticated request is parsed."""

    PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize")

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


# -- the server --------------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, registry: ModelRegistry, config: ServerConfig):
        self.registry = registry
        self.config = config
        self.in_flight = 0  # sequences admitted and not finished; changed on the event loop only
        self.requests_in_flight = 0  # generation requests admitted and not finished (event loop only)
        self.jobs: set[_Job] = set()  # generation requests running (event loop only): what a drain timeout ends
        self.client_sequences: dict[str, int] = {}  # client address -> sequences in flight (event loop only)
        self.metrics = Metrics(registry, lambda: self.in_flight, config.max_queue)
        self.router = Router(config.routing)
        self.streams = ClientStreams(config.max_streams_per_client)
        self.shutting_down = False  # from SIGTERM on (draining): /ready and new requests get 503
        self.starting = False  # models loading and warming up at startup: /ready is 503
        self.warmed: dict[str, float] = {}  # model -> seconds its warm-up generation took at startup
        self.defaults = {"max_tokens": config.default_max_tokens} if config.default_max_tokens else {}
        self.card_extras: dict = {}
        self.chat_template = read_chat_template(config)  # --chat-template: used instead of each model's own
        if config.gpu_memory_utilization is not None:
            self.card_extras["gpu_memory_utilization"] = config.gpu_memory_utilization

    def start_models(self) -> None:
        """Load the models (unless lazy) and warm each one up with a short generation through its engine: /ready
        answers 503 until this returns, and stays 503 if it raised."""
        from ..integrations.common import load_and_warm_up

        self.starting = True
        self.warmed = load_and_warm_up(self.registry, lazy=self.config.lazy)
        self.starting = False

    def reserve(self, sequences: int) -> int:
        limit = self.config.max_queue
        if sequences > limit:
            raise ParamError(f"{sequences} sequences (prompts x n) exceed this server's max_queue {limit}", param="n")
        if self.in_flight + sequences > limit:
            raise QueueFull(f"the server is at its limit of {limit} sequences in flight ({self.in_flight} now); "
                            f"retry later")
        self.in_flight += sequences
        return sequences

    def route(self, body, request: Request) -> Route:
        if isinstance(body, CompletionRequest):
            prompt = "\n".join(p for p in body.prompts() if isinstance(p, str))
        else:
            prompt = "\n".join(m.text() if m.content is not None else "" for m in body.messages)
        ctx = RouteContext(prompt=prompt, headers={k.lower(): v for k, v in request.headers.items()}, user=body.user)
        names = list(dict.fromkeys(e.name for e in list(self.registry.entries.values())))
        return self.router.route(body.model, ctx, names)

    async def open_job(self, endpoint: str, body, request: Request, sequences: int,
                       prepare: Callable[[_Job], None]) -> _Job:
        """Check limits, route, take a request (and stream) slot, reserve queue room, lease the model (loading it
        if needed), then `prepare` (tokenize, check, submit). On any error the request is counted with its
        status and everything taken is given back."""
        call = _Call(self, endpoint)
        held = _Held(self)
        job = None
        try:
            check_request(body, self.config)
            route = await asyncio.to_thread(self.route, body, request)  # rule regexes: off the event loop
            entry = self.registry.entry(route.model)  # 404 before anything else
            call.model, call.route = self.registry.display_id(entry), route
            if not route.explicit or route.ab_test:
                self.metrics.routed.labels(route.rule or "", call.model).inc()
            if body.stream:
                held.stream_key = self.streams.open(request.client.host if request.client else None)
                if held.stream_key is None:
                    raise TooManyStreams(f"this client already has {self.config.max_streams_per_client} streams open "
                                         f"(max_streams_per_client); retry when one ends")
            limit = self.config.max_concurrent_requests
            if limit is not None and self.requests_in_flight >= limit:
                raise Overloaded(f"the server is at its limit of {limit} requests in flight "
                                 f"(max_concurrent_requests); retry later")
            self.requests_in_flight += 1
            held.request = True
            client = request.client.host if request.client else "unknown"
            cap = self.config.max_sequences_per_client
            if self.client_sequences.get(client, 0) + sequences > cap:
                raise TooManySequences(f"this client would have more than {cap} sequences in flight "
                                       f"(max_sequences_per_client; {self.client_sequences.get(client, 0)} now); "
                                       f"retry when its requests end")
            self.client_sequences[client] = self.client_sequences.get(client, 0) + sequences
            held.client, held.sequences = client, sequences
            reserved = self.reserve(sequences)
            try:
                lease = self.registry.try_acquire(entry.key) or await self._acquire_slow(entry.key)
            except BaseException:
                self.in_flight -= reserved
                raise
            job = _Job(self, call, lease, reserved, held)
            await self._prepare_off_loop(job, prepare)
            return job
        except BaseException as e:
            if job is not None:
                job.close()
            else:
                held.release()
            call.finish(499 if isinstance(e, asyncio.CancelledError) else error_info(e)[0])
            raise

    async def _prepare_off_loop(self, job: "_Job", prepare: Callable[["_Job"], None]) -> None:
        """Template, tokenize and submit on a worker thread (templates are bounded, tokenizing releases the GIL),
        so /health and other requests are answered meanwhile; a request over its time budget gets a 400."""
        budget = self.config.request_cpu_budget_s
        future = asyncio.get_running_loop().run_in_executor(None, prepare, job)
        try:
            await asyncio.wait_for(asyncio.shield(future), budget)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome no longer matters
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ParamError(f"preparing this request (chat template, tokenizing) took longer than this server's "
                             f"limit of {budget:g}s (request_cpu_budget_s)", param="messages") from None

    async def _acquire_slow(self, model: str) -> Lease:
        """Load or wait for room on a worker thread; a lease won after this request was cancelled is given back."""
        future = asyncio.get_running_loop().run_in_executor(None, self.registry.acquire, model)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().release())
            raise

    def check_context(self, job: _Job, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        max_seq = job.driver.max_sequence
        total = len(prompt_ids) + params.max_new_tokens
        if total > max_seq:
            raise ParamError(f"This model's maximum context length is {max_seq} tokens. However, you requested "
                             f"{total} tokens ({len(prompt_ids)} in the {param}, {params.max_new_tokens} for the "
                             f"completion). Please reduce the length of the {param} or max_tokens.",
                             param=param, code="context_length_exceeded")
        model = job.lease.model
        vocab = model.manifest.model.vocab if model.manifest is not None else getattr(model, "vocab_size", None)
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None) if vocab else None
        if bad is not None:
            raise ParamError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})", param=param)
        bad = next((t for t, _ in params.logit_bias if not t < vocab), None) if vocab else None
        if bad is not None:
            raise ParamError(f"logit_bias: token id {bad} is outside the model's vocabulary [0, {vocab})",
                             param="logit_bias")
        job.driver.check(prompt_ids, params)

    def encode_chat(self, tokenizer, body) -> list[int]:
        """A chat request's (or /tokenize's) prompt ids, with its template options, its tools (the template's
        `tools` variable, as HF's apply_chat_template(tools=...) passes them) and --chat-template."""
        options = body.template_options()
        tools = body.offered_tools()
        if tools is not None:  # the request's tools win over a `tools` in chat_template_kwargs
            options["template_kwargs"] = {**(options["template_kwargs"] or {}), "tools": tools}
        if self.chat_template is not None:
            options["template"] = self.chat_template
        if not hasattr(tokenizer, "apply_chat_template"):  # a custom model's text codec renders its own way
            if options["continue_final_message"] or options["template_kwargs"]:
                raise ParamError("this model renders chats itself: continue_final_message, chat_template_kwargs "
                                 "and tools do not apply", param="tools" if tools else "messages")
            return tokenizer.encode_chat(body.message_dicts(), body.add_generation_prompt)
        return tokenizer.encode_chat(body.message_dicts(), body.add_generation_prompt, **options)

    def tool_parser(self, tokenizer):
        """The tool-call parser for a model: --tool-call-parser, else the one its chat template's text shows
        (tool_calls.detect); None when neither names one."""
        from ..tool_calls import detect, get_parser

        if self.config.tool_call_parser:
            return get_parser(self.config.tool_call_parser)
        return detect(self.chat_template or getattr(tokenizer, "chat_template", None))

    def card(self, e: Entry) -> ModelCard:
        return ModelCard(**{**self.registry.describe(e), **self.card_extras})

    def response_headers(self, job: _Job) -> dict:
        route = job.call.route
        return {"X-Inferneo-Model": job.lease.entry.key, "X-Inferneo-Route": route.describe() if route else ""}

    def model_field(self, body, job: _Job) -> str:
        """The response's `model`: what the request named, or (routed, A/B) the model that answered."""
        route = job.call.route
        return body.model if route is not None and route.explicit and not route.ab_test else job.call.model


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tokenizer, lps: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in lps:
        text = _token_text(tokenizer, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({_token_text(tokenizer, t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _chat_logprobs(tokenizer, lps: list[TokenLogprobs]) -> ChoiceLogprobs:
    def top(t: int, v: float) -> TopLogprob:
        s = _token_text(tokenizer, t)
        return TopLogprob(token=s, logprob=v, bytes=list(s.encode("utf-8")))

    content = []
    for lp in lps:
        s = _token_text(tokenizer, lp.token_id)
        content.append(ChatTokenLogprob(token=s, logprob=lp.logprob, bytes=list(s.encode("utf-8")),
                                        top_logprobs=[top(t, v) for t, v in lp.top]))
    return ChoiceLogprobs(content=content)


def create_app(registry: ModelRegistry, config: ServerConfig) -> FastAPI:
    """The app over `registry` (a ModelRegistry or ModelManager) with `config`'s settings. The registry is
    closed (drained) when the app shuts down. Loading and warming up the models is the caller's:
    `app.state.inferneo.start_models()` (run_server runs it on a thread, a Ray replica in its constructor)."""
    state = ServerState(registry, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.shutting_down = True  # uvicorn has already waited for in-flight requests; drain the engines
        await asyncio.to_thread(registry.close, config.graceful_timeout_s)

    app = FastAPI(title="Inferneo", version=__version__, lifespan=lifespan)
    app.state.inferneo = state
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(_RequireAPIKey, config=config)  # outside BodyLimit: a keyless request is not read
    app.add_middleware(_RefuseWhileDraining, state=state)

    # -- errors ------------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint:
            _Call(state, endpoint).finish(400)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return error_response(400, ErrorInfo(message=msg, type="invalid_request_error", code="invalid_json"))
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, ErrorInfo(message=msg, type="invalid_request_error", param=param))

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

    guard = AdminGuard(config)

    def admin(request: Request) -> None:
        guard.check(request)

    def public_card(e: Entry, request: Request) -> ModelCard:
        """A model's card; to non-admins without paths, notes or load errors (which hold paths and tracebacks)."""
        card = state.card(e)
        if guard.is_admin(request):
            return card
        data = card.model_dump()
        for name in ADMIN_ONLY_FIELDS:
            data.pop(name, None)
        if data.get("error"):
            data["error"] = "the last load failed (details for admins)"
        return ModelCard(**data)

    # -- health, models, metrics ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """200 once the models loaded at startup are loaded and warmed up (lazy ones load on first use and do not
        count); 503 while they load, when nothing can be served, and from SIGTERM on."""
        if state.shutting_down:
            return JSONResponse({"status": "not ready", "reason": "shutting down"}, status_code=503)
        if state.starting:
            return JSONResponse({"status": "not ready", "reason": "loading and warming up the models"},
                                status_code=503)
        loaded = registry.loaded()
        entries = list(registry.entries.values())
        errors = {e.key: e.error for e in entries if e.error}
        # not ready: nothing to serve, or nothing loaded because loading failed (unloaded models load on use)
        if not loaded and (not entries or (errors and not config.lazy)):
            return JSONResponse({"status": "not ready", "reason": "no model is loaded", "errors": errors},
                                status_code=503)
        return {"status": "ready", "models": registry.names, "loaded": loaded, "warmed": list(state.warmed)}

    @app.get("/metrics")
    async def metrics():
        if not config.enable_metrics:
            raise StarletteHTTPException(404, "metrics are off (enable_metrics: false)")
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request):
        return ModelList(data=[public_card(e, request) for e in list(registry.entries.values())])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str, request: Request):
        return public_card(registry.entry(model_id), request)

    # -- model management ------------------------------------------------------------------------------
    @app.post("/v1/models", status_code=201, response_model=ModelCard, responses=ADMIN_RESPONSES,
              dependencies=[Depends(admin)])
    async def register_model(body: RegisterModelRequest):
        values = body.model_dump(exclude={"load"}, exclude_none=True)
        signed = bool(getattr(registry, "trusted_keys", None))
        try:
            check_registration(body.path, config, signed)
            for field, paths in (("tokenizer", [body.tokenizer] if body.tokenizer else []),
                                 ("adapters", body.adapters or [])):
                for path in paths:
                    check_registration(path, config, signed, field)
        except RegistrationRefused as e:
            logger.warning("refused to register %s over the API: %s", body.path[:200], e)
            return error_response(*error_info(e))
        for key, default in (("format", config.model_type), ("dtype", config.dtype),
                             ("quantization", config.quantization), ("tokenizer", config.tokenizer)):
            values.setdefault(key, default)
        try:
            spec = ModelConfig.model_validate({k: v for k, v in values.items() if v is not None})
            entry = await asyncio.to_thread(registry.register, spec=spec)
        except (InferneoError, ValueError, OSError) as e:
            status, info = registration_error(e)
            return error_response(status, info)
        if body.load:
            try:
                await asyncio.to_thread(registry.load, entry.key)
            except BaseException as e:
                await asyncio.to_thread(_forget, registry, entry.key)  # a model that failed to load is not kept
                if isinstance(e, InferneoError) and not isinstance(e, (CapacityError, RegistryError)):
                    return error_response(*registration_error(e))
                raise
        logger.info("model %s: registered from %s", entry.key, entry.source)
        return state.card(entry)

    @app.post("/v1/models/{model_id:path}/load", response_model=ModelCard, responses=ADMIN_RESPONSES,
              dependencies=[Depends(admin)])
    async def load_model(model_id: str):
        entry = registry.entry(model_id)
        await asyncio.to_thread(registry.load, entry.key)
        return state.card(entry)

    @app.post("/v1/models/{model_id:path}/unload", response_model=ModelCard, responses=ADMIN_RESPONSES,
              dependencies=[Depends(admin)])
    async def unload_model(model_id: str):
        return state.card(await asyncio.to_thread(registry.unload, registry.entry(model_id).key))

    @app.delete("/v1/models/{model_id:path}", responses=ADMIN_RESPONSES, dependencies=[Depends(admin)])
    async def unregister_model(model_id: str):
        entry = await asyncio.to_thread(registry.unregister, registry.entry(model_id).key)
        return {"id": entry.key, "object": "model", "deleted": True}

    @app.get("/v1/routing", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def get_routing():
        return state.router.to_dict()

    @app.post("/v1/routing/rules", status_code=201, dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def add_rule(body: RoutingRuleRequest):
        return state.router.add_rule(body.name, body.condition, body.model, body.priority).to_dict()

    @app.delete("/v1/routing/rules/{name}", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def delete_rule(name: str):
        state.router.remove_rule(name)
        return {"name": name, "deleted": True}

    @app.get("/v1/ab_tests", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def list_ab_tests():
        return {"data": state.router.to_dict()["ab_tests"]}

    @app.post("/v1/ab_tests", status_code=201, dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def add_ab_test(body: ABTestRequest):
        return state.router.add_ab_test(body.name, body.model_a, body.model_b, body.traffic_split,
                                        body.sticky).to_dict()

    @app.get("/v1/ab_tests/{name}", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def get_ab_test(name: str):
        test = state.router.ab_tests.get(name)
        if test is None:
            raise RoutingError(f"no A/B test {name!r}; tests: {', '.join(state.router.ab_tests) or 'none'}",
                               code="not_found")
        return test.to_dict()

    @app.delete("/v1/ab_tests/{name}", dependencies=[Depends(admin)], responses=ADMIN_RESPONSES)
    async def delete_ab_test(name: str):
        state.router.remove_ab_test(name)
        return {"name": name, "deleted": True}

    # -- vLLM's tokenizer endpoints and /version ------------------------------------------------------------
    async def lease_for(model: Optional[str], request: Request) -> Lease:
        """The model a /tokenize or /detokenize request names (or the routing default), leased (loaded if need be)."""
        ctx = RouteContext(prompt="", headers={k.lower(): v for k, v in request.headers.items()}, user=None)
        names = list(dict.fromkeys(e.name for e in list(registry.entries.values())))
        entry = registry.entry(state.router.route(model, ctx, names).model)
        return registry.try_acquire(entry.key) or await state._acquire_slow(entry.key)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: dict, request: Request):
        # vLLM's two shapes: {prompt} or {messages} (a union would name the wrong one's fields in errors)
        try:
            body = (TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest).model_validate(body)
        except ValidationError as e:  # answered as FastAPI's own validation errors are: a 400 naming the field
            raise RequestValidationError(e.errors()) from None
        lease = await lease_for(body.model, request)
        try:
            tokenizer = lease.model.tokenizer
            if isinstance(body, TokenizeChatRequest):
                ids = await asyncio.to_thread(state.encode_chat, tokenizer, body)
            else:
                ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
            return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=lease.driver.max_sequence)
        finally:
            lease.release()

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest, request: Request):
        lease = await lease_for(body.model, request)
        try:
            model = lease.model
            vocab = model.manifest.model.vocab if model.manifest is not None else getattr(model, "vocab_size", None)
            bad = next((t for t in body.tokens if not t < vocab), None) if vocab else None
            if bad is not None:
                raise ParamError(f"token id {bad} is outside the model's vocabulary [0, {vocab})", param="tokens")
            return DetokenizeResponse(prompt=await asyncio.to_thread(model.tokenizer.decode, body.tokens))
        finally:
            lease.release()

    # -- embeddings (encoder artifacts: task feature-extraction) -------------------------------------------
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def embeddings(body: EmbeddingRequest):
        import base64

        from ..embedding import EmbeddingModel

        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ParamError("input must hold at least one text", param="input")
        lease = await state._acquire_slow(body.model)
        try:
            model = lease.model
            if not isinstance(model, EmbeddingModel) or model.info.output != "embedding":
                raise ParamError(f"model {body.model!r} does not return embeddings", param="model")
            if body.dimensions is not None and body.dimensions != model.dim:
                raise ParamError(f"dimensions {body.dimensions} is not supported: {body.model!r} returns {model.dim}",
                                 param="dimensions")
            vectors = await anyio.to_thread.run_sync(model.embed, texts)
            tokens = int(model.tokenize(texts)["attention_mask"].sum())
        finally:
            lease.release()
        data = [Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else v.tolist()) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                                   total_tokens=tokens))

    # -- completions -----------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request, response: Response):
        prompts = body.prompts()
        echoed: list[str] = []  # with echo: the text of each prompt

        def prepare(job: _Job) -> None:
            ids_list, params = [], []
            for p in prompts:
                ids = job.tokenizer.encode(p) if isinstance(p, str) else list(p)
                job.prompt_tokens += len(ids)
                if body.echo:  # each choice's text starts with its prompt (token prompts: decoded)
                    echoed.append(p if isinstance(p, str) else
                                  job.tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens))
                for i in range(body.n):  # choice p * n + i samples with seed + i
                    sp = body.to_sampling_params(state.defaults, seed_offset=i)
                    state.check_context(job, ids, sp, "prompt")
                    ids_list.append(ids)
                    params.append(sp)
            job.submit(ids_list, params)

        job = await state.open_job("completions", body, request, len(prompts) * body.n, prepare)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = state.model_field(body, job)
        if body.stream:
            return _EventStream(_stream_completion(job, rid, created, body, model, echoed),
                                on_close=partial(_end, job), headers=state.response_headers(job))
        await _run_to_end(job, request)
        choices = [CompletionChoice(index=i, text=(echoed[i // body.n] if echoed else "") + s.text,
                                    finish_reason=s.finish_reason,
                                    logprobs=_completion_logprobs(job.tokenizer, s.logprobs, 0)
                                    if body.logprobs is not None else None)
                   for i, s in enumerate(job.seqs)]
        job.call.finish(200)
        response.headers.update(state.response_headers(job))
        return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=job.usage())

    # -- chat completions --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        tooling = {"parser": None}  # the tool-call parser when the request offers tools (set by prepare)

        def prepare(job: _Job) -> None:
            tools, parser, constraint = body.offered_tools(), None, None
            if tools is not None:
                parser = state.tool_parser(job.tokenizer)
                if parser is None:
                    raise ParamError("tools: this model's chat template shows no tool-call format this server "
                                     "knows (hermes, llama3_json, mistral); start the server with "
                                     "--tool-call-parser NAME", param="tools")
                constraint = body.tool_constraint(parser, tools)
                tooling["parser"] = parser
            ids = state.encode_chat(job.tokenizer, body)
            job.prompt_tokens = len(ids)
            max_seq = job.driver.max_sequence
            room = max_seq - len(ids)
            if room < 1 and body.requested_max_tokens is None:
                raise ParamError(f"This model's maximum context length is {max_seq} tokens. However, your messages "
                                 f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                                 param="messages", code="context_length_exceeded")
            default_max = min(room, config.default_max_tokens or config.max_chat_default_tokens)
            params = [body.to_sampling_params(max(default_max, 1), state.defaults, seed_offset=i,
                                              tool_constraint=constraint,
                                              keep_special_tokens=parser is not None and parser.name == "mistral")
                      for i in range(body.n)]
            for sp in params:
                state.check_context(job, ids, sp, "messages")
            job.submit([ids] * body.n, params)

        job = await state.open_job("chat", body, request, body.n, prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = state.model_field(body, job)
        if body.stream:
            return _EventStream(_stream_chat(job, rid, created, body, model, tooling["parser"]),
                                on_close=partial(_end, job), headers=state.response_headers(job))
        await _run_to_end(job, request)
        choices = []
        for i, s in enumerate(job.seqs):
            message, finish = ResponseMessage(content=s.text), s.finish_reason
            parsed = tooling["parser"].parse(s.text) if tooling["parser"] is not None else None
            if parsed is not None and parsed.calls:  # OpenAI's shape: the calls, the text before them, "tool_calls"
                message = ResponseMessage(content=parsed.content, tool_calls=[c.to_openai() for c in parsed.calls])
                finish = "tool_calls"
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish,
                                      logprobs=_chat_logprobs(job.tokenizer, s.logprobs) if body.logprobs else None))
        job.call.finish(200)
        response.headers.update(state.response_headers(job))
        return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=job.usage())

    return app


def _forget(registry, key: str) -> None:
    try:
        registry.unregister(key)
    except Exception as e:  # noqa: BLE001 - the load error is what the caller needs to see
        logger.warning("model %s: failed to load and could not be unregistered: %s", key, e)


async def _run_to_end(job: _Job, request: Request) -> None:
    """Wait for every sequence of a non-streaming request; the lease and queue room are given back after. A client
    that closes its connection meanwhile ends the request: its sequences are cancelled at the engine's next step."""
    watcher = asyncio.ensure_future(_watch_disconnect(job, request))
    try:
        async for _ in job.events():
            pass
    except BaseException as e:
        job.call.finish(499 if isinstance(e, (asyncio.CancelledError, ClientGone)) else error_info(e)[0])
        raise
    finally:
        watcher.cancel()
        job.close()


async def _watch_disconnect(job: _Job, request: Request) -> None:
    # the body has been read, so the next ASGI message is the disconnect (uvicorn sends it when the socket closes)
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.abort(ClientGone("the client closed the connection; its sequences were cancelled"))
            return


def _end(job: _Job) -> None:
    job.close()
    job.call.finish(499)  # a no-op when the stream already recorded how it ended


async def _guarded(job: _Job, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Record the stream's outcome; an error after the headers went out becomes an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit, Cancelled):
        job.call.finish(499)
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band as OpenAI does
        status, info = error_info(e)
        if status >= 500 and status != 503:
            logger.exception("stream failed", exc_info=e)
        job.call.finish(status)
        yield _sse(ErrorResponse(error=info))
        yield "data: [DONE]\n\n"
        return
    job.call.finish(200)
    yield "data: [DONE]\n\n"


def _stream_completion(job: _Job, rid: str, created: int, body: CompletionRequest, model: str,
                       echoed: list[str]):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks():
        offsets = [0] * len(job.tickets)
        for i in range(len(job.tickets) if echoed else 0):  # echo: each choice's prompt first, as vLLM streams it
            choice = CompletionChoice(index=i, text=echoed[i // body.n])
            yield _sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        async for i, ev in job.events():
            lp = None
            if ev.logprobs is not None:
                lp = _completion_logprobs(job.tokenizer, [ev.logprobs], offsets[i])
                offsets[i] += sum(len(t) for t in lp.tokens)
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            choice = CompletionChoice(index=i, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason)
            yield _sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        if include_usage:
            yield _sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=job.usage()))

    return _guarded(job, chunks())


def _stream_chat(job: _Job, rid: str, created: int, body: ChatCompletionRequest, model: str, parser=None):
    """`parser`: the request offers tools; each choice's text goes through a tool_calls.ToolStream: content streams
    until a call's marker, the rest is held and sent at the end as `tool_calls` deltas (first the call's id, type
    and name, then its arguments), with finish_reason "tool_calls"."""
    from ..tool_calls import ToolStream

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tool_streams = [ToolStream(parser) for _ in range(body.n)] if parser is not None else None

    def chunk(choices, usage=None) -> str:
        return _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    async def chunks():
        yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(body.n)])
        async for i, ev in job.events():
            lp = _chat_logprobs(job.tokenizer, [ev.logprobs]) if ev.logprobs is not None else None
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            text, finish = ev.text, ev.finish_reason
            if tool_streams is not None:
                text = tool_streams[i].feed(ev.text) if ev.text else ""
                if finish is not None:
                    rest, calls = tool_streams[i].finish()
                    text += rest
                    if calls:
                        if text or lp is not None:
                            yield chunk([ChatChunkChoice(index=i, delta={"content": text} if text else {},
                                                         logprobs=lp)])
                        text, lp, finish = "", None, "tool_calls"
                        for k, call in enumerate(calls):
                            head = {"index": k, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}
                            yield chunk([ChatChunkChoice(index=i, delta={"tool_calls": [head]})])
                            yield chunk([ChatChunkChoice(index=i, delta={"tool_calls": [
                                {"index": k, "function": {"arguments": call.arguments}}]})])
                if not text and finish is None and lp is None:
                    continue
            delta = {"content": text} if text else {}
            yield chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)])
        if include_usage:
            yield chunk([], usage=job.usage())

    return _guarded(job, chunks())


# -- running it ------------------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    log = logging.getLogger("inferneo")
    log.setLevel(logging.DEBUG if level == "trace" else level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _cuda_budget(config: ServerConfig) -> Optional[int]:
    """--gpu-memory-utilization on a CUDA device: that share of the device's memory, as the memory budget."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = int(config.device.partition(":")[2] or 0)
    return int(torch.cuda.get_device_properties(index).total_memory * config.gpu_memory_utilization)


def build_registry(config: ServerConfig):
    """The ModelManager `inferneo serve` runs: the configured models (and those saved in `registry_path`)."""
    from ..manager import ModelManager

    config.check_parallelism()
    budget, notes = config.memory_budget_bytes, []
    util = config.gpu_memory_utilization
    if util is not None:
        if config.device.startswith("cuda"):
            cuda = _cuda_budget(config) if budget is None else None
            if cuda is not None:
                budget = cuda
                notes.append(f"--gpu-memory-utilization {util}: memory budget {cuda / 1e9:.2f} GB of "
                             f"{config.device} for weights + KV caches")
            elif budget is not None:
                notes.append(f"--gpu-memory-utilization {util}: not applied, --memory-budget-gb "
                             f"{config.memory_budget_gb} sets the budget")
        else:
            notes.append(f"--gpu-memory-utilization {util} has no effect on {config.device}: it sets the CUDA "
                         f"memory budget (weights + KV caches); use --memory-budget-gb for a CPU budget")
            logger.warning(notes[-1])
    manager = ModelManager(max_models=config.max_models, memory_budget_bytes=budget, lazy_loading=True,
                           registry_path=config.registry_path, device=config.device, threads=config.threads,
                           wait_s=config.load_wait_s, trusted_keys=config.trusted_keys or None,
                           max_model_len=config.max_model_len, max_batch_size=config.max_batch_size,
                           engine_options=config.engine_options())
    try:
        manager.notes.extend(notes)
        configured = artifacts_to_serve(config)
        for spec in configured:
            manager.add_configured(spec)
        if not manager.entries:
            from .config import ConfigError

            raise ConfigError(f"no model to serve: the registry {config.registry_path} restored none"
                              + (f" ({'; '.join(manager.restore_errors.values())})" if manager.restore_errors else ""))
    except BaseException:
        manager.close(timeout=0)
        raise
    return manager


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain before its shutdown. On the first SIGTERM (or SIGINT) /ready turns 503 at
    once and new requests get 503 while the port stays open and in-flight requests (streams too) run to their end,
    so a load balancer takes the replica out before connections are refused. When no request is left, or
    `drain_timeout` seconds have passed (generation requests still running then end with a 503), uvicorn's
    shutdown runs: the port closes, the engines stop, and `run()` returns (exit status 0). A second signal
    stops the server at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.drain_deadline: Optional[float] = None
        self._announced = False

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.state.shutting_down = True  # here, in the handler: the very next probe sees it
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return  # not recorded as uvicorn's captured signal, which it re-raises after shutdown (exit -15, not 0)
        super().handle_exit(sig, frame)
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:  # uvicorn calls it every 0.1 s
        if self.drain_deadline is not None and not self.should_exit:
            running, left = len(self.server_state.tasks), self.drain_deadline - time.monotonic()
            if not self._announced:
                self._announced = True
                logger.warning("draining: /ready is 503, new requests get 503; waiting up to %.0fs for %d running "
                               "request(s)", self.drain_timeout, running)
            if not running or left <= 0:
                if running:
                    # generation requests end with a 503 (a stream: an error event and [DONE]) rather than a cut
                    # connection; uvicorn cancels whatever else still runs after a second more
                    jobs = list(self.state.jobs)
                    for job in jobs:
                        job.abort(DriverStopped("the server shut down (drain timeout) before this request finished"))
                    logger.warning("drain timeout (%.0fs): ending %d running generation request(s) with a 503",
                                   self.drain_timeout, len(jobs))
                self.config.timeout_graceful_shutdown = max(left, 1.0)  # uvicorn's own wait for what is left
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain (DrainingServer) and return. The port opens at once (/health
    answers, /ready is 503) while the models load and warm up on a thread; a model that fails to load stops the
    server and its error is raised here."""
    _setup_logging(config.log_level)
    registry = build_registry(config)
    app = create_app(registry, config)
    state: ServerState = app.state.inferneo
    if config.admin_api and not config.admin_token and not binds_loopback(config.host):
        logger.warning("binding %s without an admin token: the management API is off (set INFERNEO_ADMIN_TOKEN)",
                       config.host)
    # proxy_headers off: the client address (admin loopback check, per-client caps) is the socket peer, never a
    # header such as X-Forwarded-For
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           proxy_headers=False,
                                           timeout_graceful_shutdown=config.graceful_timeout_s),
                            state, drain_timeout=config.graceful_timeout_s)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            state.start_models()
        except BaseException as e:  # noqa: BLE001 - a server should not run on a model that cannot load
            if not state.shutting_down:
                failed.append(e)
                server.should_exit = True
            return
        loaded = registry.loaded()
        lazy = [n for n in registry.names if n not in loaded]
        logger.info("serving %s on http://%s:%d%s", ", ".join(registry.names), config.host, config.port,
                    f" ({', '.join(lazy)} load on first use)" if lazy else "")

    threading.Thread(target=start, name="inferneo-startup", daemon=True).start()
    server.run()
    if failed:
        raise failed[0]
