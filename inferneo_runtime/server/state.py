"""The server's shared state and the admission of a generation request: limits, routing, queue room, the model's
lease, then tokenizing and submitting off the event loop (`ServerState.open_job`)."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from fastapi import Request

from ..drivers import DriverStopped
from ..registry import Entry, Lease, ModelRegistry
from ..sampling import SamplingParams
from .admin_guard import AdminGuard
from .config import ServerConfig, read_chat_template
from .errors import Overloaded, QueueFull, TooManySequences, TooManyStreams, error_info
from .jobs import Call, Held, Job
from .limits import ClientStreams, check_request
from .metrics import Metrics
from .protocol import CompletionRequest, ModelCard, ParamError
from .routing import Route, RouteContext, Router

logger = logging.getLogger("inferneo.server")


class ServerState:
    """What every route shares: the registry, the settings, the router, the admission counters and the metrics."""

    def __init__(self, registry: ModelRegistry, config: ServerConfig):
        self.registry = registry
        self.config = config
        self.guard = AdminGuard(config)
        self.in_flight = 0  # sequences admitted and not finished; changed on the event loop only
        self.requests_in_flight = 0  # generation requests admitted and not finished (event loop only)
        self.jobs: set[Job] = set()  # generation requests running (event loop only): what a drain timeout ends
        self.client_sequences: dict[str, int] = {}  # client address -> sequences in flight (event loop only)
        self.metrics = Metrics(registry, lambda: self.in_flight, config.max_queue)
        self.router = Router(config.routing)
        self.streams = ClientStreams(config.max_streams_per_client)
        # waits for a model's lease (loading it, or for busy models to free the budget: up to load_wait_s) run on
        # threads of their own: in the default executor they would hold the threads that routing, tokenizing and
        # /tokenize need, stalling requests to loaded models while others wait for room. Generation requests reserve
        # queue room before they wait, so max_queue of them wait at most; the rest is for /tokenize, embeddings, admin.
        self.lease_waits = ThreadPoolExecutor(config.max_queue + 16, thread_name_prefix="inferneo-lease")
        self.shutting_down = False  # from SIGTERM on (draining): /ready and new requests get 503
        self.drain_expired = asyncio.Event()  # set at the drain timeout: requests still waiting for a model get 503
        self.starting = False  # models loading and warming up at startup: /ready is 503
        self.warmed: dict[str, float] = {}  # model -> seconds its warm-up generation took at startup
        self.defaults = {"max_tokens": config.default_max_tokens} if config.default_max_tokens else {}
        self.told_defaults: set[str] = set()  # models whose generation_config defaults were logged
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
                       prepare: Callable[[Job], None]) -> Job:
        """Check limits, route, take a request (and stream) slot, reserve queue room, lease the model (loading it
        if needed), then `prepare` (tokenize, check, submit). On any error the request is counted with its
        status and everything taken is given back."""
        call = Call(self, endpoint)
        held = Held(self)
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
                lease = self.registry.try_acquire(entry.key) or await self.acquire(entry.key)
            except BaseException:
                self.in_flight -= reserved
                raise
            job = Job(self, call, lease, reserved, held)
            await self._prepare_off_loop(job, prepare)
            return job
        except BaseException as e:
            if job is not None:
                job.close()
            else:
                held.release()
            call.finish(499 if isinstance(e, asyncio.CancelledError) else error_info(e)[0])
            raise

    async def _prepare_off_loop(self, job: "Job", prepare: Callable[["Job"], None]) -> None:
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

    def wait_registry(self, fn: Callable, *args) -> asyncio.Future:
        """Run a registry call that may load a model or wait for room (acquire, load) on a `lease_waits` thread."""
        return asyncio.get_running_loop().run_in_executor(self.lease_waits, fn, *args)

    async def acquire(self, model: str) -> Lease:
        """Load or wait for room on a worker thread; a lease won after this request was cancelled, or after the drain
        timeout ended its wait (DriverStopped: a 503), is given back."""
        future = self.wait_registry(self.registry.acquire, model)
        drained = asyncio.ensure_future(self.drain_expired.wait())
        try:
            await asyncio.wait((future, drained), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().release())
            raise
        finally:
            drained.cancel()
        if not self.drain_expired.is_set():
            return future.result()
        future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().release())
        raise DriverStopped(f"the server shut down (drain timeout) while this request waited for model {model!r}")

    def check_context(self, job: Job, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        if not prompt_ids:
            raise ParamError(f"the {param} is empty after tokenization", param=param)
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

    def sampling_defaults(self, job: Job) -> dict:
        """What a request's unset sampling fields take: the server's default_max_tokens, then (generation_config
        auto) the model's generation_config.json values; OpenAI's defaults for the rest."""
        model = {} if self.config.generation_config == "none" else getattr(job.lease.model, "sampling_defaults", {})
        if model and job.lease.name not in self.told_defaults:  # said once per model, as vLLM says it at start
            self.told_defaults.add(job.lease.name)
            logger.info("model %s: requests that leave them unset take %s from its generation_config.json "
                        "(--generation-config none: OpenAI's defaults)", job.lease.name,
                        ", ".join(f"{k}={v}" for k, v in model.items()))
        return {**model, **self.defaults}

    def reasoning(self, job: Job, prompt_ids: list[int], continued: Optional[str] = None):
        """A chat request's reasoning split: harmony.Harmony for gpt-oss's format (reasoning_parser harmony, or
        auto and the chat template shows it), else reasoning.Reasoning; None when its model's reasoning_parser (its
        `models:` entry's, else the server's) is none, or auto and the chat template shows neither format.
        `continued`: the assistant message the model continues (continue_final_message), which may open it."""
        from .. import harmony, reasoning

        spec = job.lease.entry.spec
        setting = getattr(spec, "reasoning_parser", None) or self.config.reasoning_parser
        template = self.chat_template or getattr(job.tokenizer, "chat_template", None)
        if not hasattr(job.tokenizer, "apply_chat_template") or setting == "none":
            return None
        if setting in ("harmony", "openai_gptoss") or (setting in (None, "auto") and
                                                       harmony.detect(template, job.tokenizer)):
            return harmony.Harmony()
        if not reasoning.enabled(setting, template, job.tokenizer):
            return None
        return reasoning.Reasoning(reasoning.prompt_opens_reasoning(job.tokenizer, prompt_ids) or (
            continued is not None and reasoning.text_opens_reasoning(continued)))

    def card(self, e: Entry) -> ModelCard:
        return ModelCard(**{**self.registry.describe(e), **self.card_extras})

    def response_headers(self, job: Job) -> dict:
        route = job.call.route
        return {"X-Inferneo-Model": job.lease.entry.key, "X-Inferneo-Route": route.describe() if route else ""}

    def model_field(self, body, job: Job) -> str:
        """The response's `model`: what the request named, or (routed, A/B) the model that answered."""
        route = job.call.route
        return body.model if route is not None and route.explicit and not route.ab_test else job.call.model
