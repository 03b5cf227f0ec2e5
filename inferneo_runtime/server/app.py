"""The FastAPI app: OpenAI-compatible endpoints over the registry's models and their engine drivers.

A request: parse (pydantic; errors become OpenAI-shaped 400s) → find the model (404) → reserve room in
the queue (429 when `max_queue` sequences are already in flight) → lease the model (loading it, or 503
when it cannot fit the budget) → tokenize and check the context bound (400 naming the numbers) → submit
one ticket per sequence (n per prompt, seed + i) to the model's EngineDriver → await TokenEvents on an
asyncio.Queue fed from the driver thread with loop.call_soon_threadsafe → answer, or stream server-sent
events ending in `data: [DONE]`. The lease and the queue room are given back when the answer ends; a
streaming client that disconnects cancels its tickets, which frees their engine slots at the next step.

Validation errors are mapped to 400 (OpenAI answers bad parameters with 400, and so do the openai
clients' BadRequestError), not FastAPI's default 422.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import AsyncIterator, Callable, Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InferneoError, RequestError
from ..generation import TokenEvent
from ..registry import ArtifactSource, CapacityError, Entry, Lease, ModelNotFound, ModelRegistry
from ..sampling import SamplingParams, TokenLogprobs
from .config import ServerConfig, artifacts_to_serve
from .driver import Cancelled, DriverStopped
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                       ChatTokenLogprob, ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, ErrorInfo, ErrorResponse, ModelCard, ModelList, ParamError, ResponseMessage,
                       TopLogprob, UsageInfo)

logger = logging.getLogger("inferneo.server")

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # path -> metrics label
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


class QueueFull(InferneoError):
    """max_queue sequences are already in flight."""


# -- errors ---------------------------------------------------------------------------------------------
def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or any(s in text for s in ("out of memory", "failed to allocate", "bad_alloc",
                                                                 "bad allocation"))


def error_info(e: BaseException) -> tuple[int, ErrorInfo]:
    """The HTTP status and OpenAI error object for an exception."""
    if isinstance(e, ModelNotFound):
        return 404, ErrorInfo(message=str(e), type="invalid_request_error", param="model", code="model_not_found")
    if isinstance(e, RequestError):
        return 400, ErrorInfo(message=str(e), type="invalid_request_error", param=getattr(e, "param", None),
                              code=getattr(e, "code", None))
    if isinstance(e, QueueFull):
        return 429, ErrorInfo(message=str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, CapacityError) or _is_out_of_memory(e):
        msg = str(e) if isinstance(e, CapacityError) else f"out of memory: {e or type(e).__name__}; retry later"
        return 503, ErrorInfo(message=msg, type="service_unavailable", code="out_of_memory")
    if isinstance(e, DriverStopped):
        return 503, ErrorInfo(message=str(e), type="service_unavailable", code="shutting_down")
    if isinstance(e, InferneoError):
        return 500, ErrorInfo(message=str(e), type="server_error", code=type(e).__name__)
    return 500, ErrorInfo(message=f"internal error: {type(e).__name__}: {e}", type="server_error")


def error_response(status: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def _sse(payload) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


# -- per-request bookkeeping ------------------------------------------------------------------------------
class _Call:
    """One HTTP request's metrics: counted once, with its final status."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics = metrics
        self.endpoint = endpoint
        self.model = ""  # a registered model's name once known (unknown names are not used as labels)
        self.started = time.perf_counter()
        self.first_token: Optional[float] = None
        self.done = False

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.ttft.labels(self.model).observe(self.first_token - self.started)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(self.model, self.endpoint, str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(self.model, self.endpoint).observe(time.perf_counter() - self.started)


@dataclass
class _Seq:
    """One choice's output, accumulated from its TokenEvents on the event-loop side."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None


class _Job:
    """One HTTP request's sequences on one leased model, and the queue their events arrive on."""

    def __init__(self, state: "ServerState", call: _Call, lease: Lease, reserved: int):
        self.state = state
        self.call = call
        self.lease = lease
        self.reserved = reserved
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets = []
        self.seqs: list[_Seq] = []
        self.prompt_tokens = 0
        self.closed = False

    @property
    def driver(self):
        return self.lease.driver

    @property
    def tokenizer(self):
        return self.lease.model.tokenizer

    def _sink(self, index: int, item) -> None:  # called on the driver thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        self.state.metrics.prompt_tokens.labels(self.call.model).inc(self.prompt_tokens)
        for ids, p in zip(prompts, params):
            self.seqs.append(_Seq())
            self.tickets.append(self.driver.submit(ids, p, partial(self._sink, len(self.tickets))))

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

    def close(self) -> None:
        """Cancel unfinished sequences, give back the lease and the queue room. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for t in self.tickets:
            self.driver.cancel(t)
        self.lease.release()
        self.state.in_flight -= self.reserved


class _EventStream(StreamingResponse):
    """Server-sent events that stop (cancelling the generator) when the client disconnects, whatever the
    ASGI spec version, and that always run `on_close` at the end."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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


# -- the server --------------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, registry: ModelRegistry, config: ServerConfig):
        self.registry = registry
        self.config = config
        self.in_flight = 0  # sequences admitted and not finished; changed on the event loop only
        self.metrics = Metrics(registry, lambda: self.in_flight, config.max_queue)
        self.shutting_down = False
        self.defaults = {"max_tokens": config.default_max_tokens} if config.default_max_tokens else {}

    def reserve(self, sequences: int) -> int:
        limit = self.config.max_queue
        if sequences > limit:
            raise ParamError(f"{sequences} sequences (prompts x n) exceed this server's max_queue {limit}", param="n")
        if self.in_flight + sequences > limit:
            raise QueueFull(f"the server is at its limit of {limit} sequences in flight ({self.in_flight} now); "
                            f"retry later")
        self.in_flight += sequences
        return sequences

    async def open_job(self, endpoint: str, model: str, sequences: int, prepare: Callable[[_Job], None]) -> _Job:
        """Reserve queue room, lease the model (loading it if needed), then `prepare` (tokenize, check, submit).
        On any error the request is counted with its status and everything taken is given back."""
        call = _Call(self.metrics, endpoint)
        job = None
        try:
            self.registry.entry(model)  # 404 before anything else
            call.model = model
            reserved = self.reserve(sequences)
            try:
                lease = self.registry.try_acquire(model) or await self._acquire_slow(model)
            except BaseException:
                self.in_flight -= reserved
                raise
            job = _Job(self, call, lease, reserved)
            prepare(job)
            return job
        except BaseException as e:
            if job is not None:
                job.close()
            call.finish(499 if isinstance(e, asyncio.CancelledError) else error_info(e)[0])
            raise

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
        vocab = job.lease.model.manifest.model.vocab
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ParamError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})", param=param)
        job.driver.check(prompt_ids, params)


def _model_card(e: Entry) -> ModelCard:
    t = e.manifest.targets[e.target]
    try:
        created = int(datetime.fromisoformat(e.manifest.built_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        created = 0
    size = DTYPE_BYTES.get(t.dtype)
    return ModelCard(
        id=e.name, created=created, loaded=e.state == "loaded", source=e.source, architecture=e.manifest.architecture,
        format=t.format, target=e.target, dtype=t.dtype, parameters=e.weight_bytes // size if size else None,
        weight_bytes=e.weight_bytes, max_context=t.shapes.max_sequence if t.shapes else e.manifest.model.max_positions,
        max_batch=t.shapes.max_batch if t.shapes else None, validation=t.validation.model_dump(exclude_none=True),
        targets={name: {"format": x.format, "status": x.status, "dtype": x.dtype, "validation": x.validation.status}
                 for name, x in e.manifest.targets.items()})


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
    state = ServerState(registry, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.shutting_down = True  # uvicorn has already waited for in-flight requests; drain the engines
        await asyncio.to_thread(registry.close, config.graceful_timeout_s)

    app = FastAPI(title="Inferneo", version=__version__, lifespan=lifespan)
    app.state.inferneo = state

    # -- errors ------------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint:
            _Call(state.metrics, endpoint).finish(400)
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
        return error_response(exc.status_code, ErrorInfo(message=str(exc.detail), type=kind))

    @app.exception_handler(InferneoError)
    @app.exception_handler(MemoryError)
    @app.exception_handler(Exception)  # (Starlette re-raises these after answering, so they are logged)
    async def _error(request: Request, exc: Exception):
        status, info = error_info(exc)
        if status >= 500 and status != 503:
            logger.exception("request failed", exc_info=exc)
        return error_response(status, info)

    # -- health, models, metrics ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        loaded = registry.loaded()
        if state.shutting_down:
            return JSONResponse({"status": "not ready", "reason": "shutting down"}, status_code=503)
        if not loaded and not config.lazy:
            return JSONResponse({"status": "not ready", "reason": "no model is loaded",
                                 "errors": {e.name: e.error for e in registry.entries.values() if e.error}},
                                status_code=503)
        return {"status": "ready", "models": registry.names, "loaded": loaded}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=[_model_card(e) for e in registry.entries.values()])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return _model_card(registry.entry(model_id))

    # -- completions -----------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = body.prompts()

        def prepare(job: _Job) -> None:
            ids_list, params = [], []
            for p in prompts:
                ids = job.tokenizer.encode(p) if isinstance(p, str) else list(p)
                job.prompt_tokens += len(ids)
                for i in range(body.n):  # choice p * n + i samples with seed + i
                    sp = body.to_sampling_params(state.defaults, seed_offset=i)
                    state.check_context(job, ids, sp, "prompt")
                    ids_list.append(ids)
                    params.append(sp)
            job.submit(ids_list, params)

        job = await state.open_job("completions", body.model, len(prompts) * body.n, prepare)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _EventStream(_stream_completion(job, rid, created, body), on_close=partial(_end, job))
        await _run_to_end(job)
        choices = [CompletionChoice(index=i, text=s.text, finish_reason=s.finish_reason,
                                    logprobs=_completion_logprobs(job.tokenizer, s.logprobs, 0)
                                    if body.logprobs is not None else None)
                   for i, s in enumerate(job.seqs)]
        job.call.finish(200)
        return CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=job.usage())

    # -- chat completions --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        def prepare(job: _Job) -> None:
            ids = job.tokenizer.encode_chat(body.message_dicts())
            job.prompt_tokens = len(ids)
            max_seq = job.driver.max_sequence
            room = max_seq - len(ids)
            if room < 1 and body.requested_max_tokens is None:
                raise ParamError(f"This model's maximum context length is {max_seq} tokens. However, your messages "
                                 f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                                 param="messages", code="context_length_exceeded")
            default_max = min(room, config.default_max_tokens) if config.default_max_tokens else room
            params = [body.to_sampling_params(max(default_max, 1), state.defaults, seed_offset=i)
                      for i in range(body.n)]
            for sp in params:
                state.check_context(job, ids, sp, "messages")
            job.submit([ids] * body.n, params)

        job = await state.open_job("chat", body.model, body.n, prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _EventStream(_stream_chat(job, rid, created, body), on_close=partial(_end, job))
        await _run_to_end(job)
        choices = [ChatChoice(index=i, message=ResponseMessage(content=s.text), finish_reason=s.finish_reason,
                              logprobs=_chat_logprobs(job.tokenizer, s.logprobs) if body.logprobs else None)
                   for i, s in enumerate(job.seqs)]
        job.call.finish(200)
        return ChatCompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=job.usage())

    return app


async def _run_to_end(job: _Job) -> None:
    """Wait for every sequence of a non-streaming request; the lease and queue room are given back after."""
    try:
        async for _ in job.events():
            pass
    except BaseException as e:
        job.call.finish(499 if isinstance(e, asyncio.CancelledError) else error_info(e)[0])
        raise
    finally:
        job.close()


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


def _stream_completion(job: _Job, rid: str, created: int, body: CompletionRequest):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks():
        offsets = [0] * len(job.tickets)
        async for i, ev in job.events():
            lp = None
            if ev.logprobs is not None:
                lp = _completion_logprobs(job.tokenizer, [ev.logprobs], offsets[i])
                offsets[i] += sum(len(t) for t in lp.tokens)
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            choice = CompletionChoice(index=i, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason)
            yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[choice]))
        if include_usage:
            yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[], usage=job.usage()))

    return _guarded(job, chunks())


def _stream_chat(job: _Job, rid: str, created: int, body: ChatCompletionRequest):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, usage=None) -> str:
        return _sse(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices, usage=usage))

    async def chunks():
        yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(body.n)])
        async for i, ev in job.events():
            lp = _chat_logprobs(job.tokenizer, [ev.logprobs]) if ev.logprobs is not None else None
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            delta = {"content": ev.text} if ev.text else {}
            yield chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=ev.finish_reason)])
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


def build_registry(config: ServerConfig) -> ModelRegistry:
    sources = [ArtifactSource(a.path, a.target) for a in artifacts_to_serve(config)]
    return ModelRegistry(sources, max_models=config.max_models, memory_budget_bytes=config.memory_budget_bytes,
                         device=config.device, threads=config.threads, wait_s=config.load_wait_s)


def run_server(config: ServerConfig) -> None:
    """Open the artifacts, load them unless lazy, and serve until SIGINT/SIGTERM (then drain and exit)."""
    import uvicorn

    _setup_logging(config.log_level)
    registry = build_registry(config)
    try:
        loaded = [] if config.lazy else registry.preload()
    except BaseException:
        registry.close(timeout=0)
        raise
    lazy = [n for n in registry.names if n not in loaded]
    logger.info("serving %s on http://%s:%d%s", ", ".join(registry.names), config.host, config.port,
                f" ({', '.join(lazy)} load on first use)" if lazy else "")
    uvicorn.run(create_app(registry, config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=config.graceful_timeout_s)
