"""One generation request's bookkeeping: its metrics (`Call`), the sequences it runs on a leased model and the
queue their events arrive on (`Job`), and the request and stream slots it holds (`Held`). A Job gives back
everything the request took when it closes."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, AsyncIterator, Optional

from ..generation import TokenEvent
from ..registry import Lease
from ..sampling import SamplingParams, TokenLogprobs
from .protocol import UsageInfo
from .routing import Route

if TYPE_CHECKING:
    from .state import ServerState


class Call:
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
class Seq:
    """One choice's output, accumulated from its TokenEvents on the event-loop side."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None  # with the request's prompt_logprobs


class Job:
    """One HTTP request's sequences on one leased model, and the queue their events arrive on. It owns what
    the request took (lease, queue room, request and stream slots) and gives it all back on close."""

    def __init__(self, state: "ServerState", call: Call, lease: Lease, reserved: int, held: "Held"):
        self.state = state
        self.call = call
        self.lease = lease
        self.reserved = reserved
        self.held = held
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets = []
        self.seqs: list[Seq] = []
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
            self.seqs.append(Seq())
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
            if item.prompt_logprobs is not None:
                seq.prompt_logprobs = item.prompt_logprobs
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


class Held:
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
