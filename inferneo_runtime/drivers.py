"""The contract between a loaded model and whatever serves it (the server, Ray Serve, KServe, Triton, LMI), and the
driver that meets it for generation models: one thread per loaded model drives its Engine (continuous batching).

`Driver` is what every loaded model's driver offers: `EngineDriver` here, `models.CustomDriver` for a custom
Python model, `embedding.EmbeddingDriver` for an encoder (which refuses generation). A `Ticket` is one sequence
handed to any of them.

The Engine is not thread-safe, so only the driver thread touches it. Other threads hand it work through
an inbox (a list under a Condition): `submit` appends an "add", `cancel` appends a "cancel". Before each
`engine.step()` the driver drains the inbox, so a new request joins the running batch at the next step.
Every TokenEvent goes to the submitting ticket's `sink`, a callable that must not block (the server's
sink is `loop.call_soon_threadsafe(queue.put_nowait, ...)`). A ticket ends with its last TokenEvent
(finish_reason set), or with an exception item: `Cancelled`, or the error that made a step fail.

If a step raises (out of memory, a backend failure), every request in the engine gets that error, the
engine is replaced by a fresh one (its cache dropped) and the driver keeps serving.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional, Protocol, Sequence, Union

from .errors import InferneoError
from .generation import Engine, Request, TokenEvent
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .speculative import SpeculationStats

logger = logging.getLogger("inferneo.engine")

Sink = Callable[[Union[TokenEvent, BaseException]], None]


class Cancelled(Exception):
    """The ticket was cancelled (its client went away) before it finished."""


class DriverStopped(InferneoError):
    """The driver is shutting down and takes no new work."""


class Ticket:
    """One sequence handed to a driver: its prompt, params, where its events go, and its engine Request."""

    __slots__ = ("prompt_ids", "params", "sink", "request", "done", "cancelled")

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.request: Optional[Request] = None  # set by the driver thread when the engine accepts it
        self.done = False  # set by the driver thread after the ticket's last item was sent
        self.cancelled = False  # set by a driver without an inbox (CustomDriver) when its client went away


class Driver(Protocol):
    """What serving code may rely on for any loaded model. `submit` and `cancel` are called from any thread;
    items reach the ticket's `sink` (which must not block) from the driver's own thread(s)."""

    name: str
    max_sequence: int  # prompt + generated tokens one sequence may reach
    cache_bytes: int  # memory held for cached keys/values (reported in /metrics)
    in_flight: int  # sequences submitted and not yet done (reported in /metrics)

    @property
    def idle(self) -> bool:
        """Nothing submitted is still running (the server's unload and drain wait for this)."""

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestError if this request would be rejected, before anything is submitted."""

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink) -> Ticket:
        """Queue one sequence; raise DriverStopped once `stop` was called."""

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: stop the sequence soon and send it `Cancelled`. A no-op once it is done."""

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Take no new work, finish what was submitted; False if that did not happen within `timeout`."""


class EngineDriver:
    """Owns one Engine and the thread that steps it while it has work."""

    def __init__(self, name: str, model, max_batch: Optional[int] = None, max_sequence: Optional[int] = None,
                 speculative=None, prefix_cache_bytes: int = 0, prefill_chunk: Optional[int] = None):
        self.name = name
        self._model = model
        self._caps = (max_batch, max_sequence)  # --max-batch-size / --max-model-len, within the artifact's bounds
        # engine settings that outlive a failed engine: its prefix cache holds only completed prefills
        self._speculative, self._prefill_chunk = speculative, prefill_chunk
        self.spec_stats = SpeculationStats()
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.engine = self._new_engine()
        self.max_sequence = self.engine.max_sequence
        self.max_batch = self.engine.max_batch
        self.cache_bytes = 0  # KV-cache bytes held after the last step (written by the driver thread): see _cache_bytes
        self.in_flight = 0  # tickets submitted and not yet done (changed under the lock)
        self.steps = 0
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Ticket]] = []
        self._live: dict[int, Ticket] = {}  # engine request id -> ticket; driver thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"inferneo-engine-{name}", daemon=True)
        self._thread.start()

    def _new_engine(self) -> Engine:
        engine = Engine(self._model.backend, self._model.eos_ids, self._model.tokenizer,
                        speculative=self._speculative, spec_stats=self.spec_stats, prefix_cache=self.prefix_cache,
                        prefill_chunk=self._prefill_chunk, draft_backend=getattr(self._model, "draft_backend", None))
        max_batch, max_sequence = self._caps
        if max_batch is not None:
            engine.max_batch = min(engine.max_batch, max_batch)
        if max_sequence is not None:
            engine.max_sequence = min(engine.max_sequence, max_sequence)
        return engine

    # -- any thread -------------------------------------------------------------------------------
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestError if the engine would reject this request. Reads only fixed engine settings."""
        self.engine.check(prompt_ids, params)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink) -> Ticket:
        ticket = Ticket(prompt_ids, params, sink)
        with self._cond:
            if self._stopping:
                raise DriverStopped(f"model {self.name!r} is shutting down")
            self._inbox.append(("add", ticket))
            self.in_flight += 1
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Cancel a ticket; its engine slot is freed at the next step. A no-op once the ticket is done."""
        with self._cond:
            if not ticket.done:
                self._inbox.append(("cancel", ticket))
                self._cond.notify()

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Take no new work, finish what was submitted, end the thread. False if it did not end in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the driver thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_work and not self._stopping:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                if self._stopping and not inbox and not self.engine.has_work:
                    return
            for op, ticket in inbox:
                if op == "add":
                    self._add(ticket)
                elif not ticket.done:
                    self.engine.cancel(ticket.request)
                    self._finish(ticket, Cancelled())
            if self.engine.has_work:
                self._step()

    def _add(self, ticket: Ticket) -> None:
        try:
            ticket.request = self.engine.add(ticket.prompt_ids, ticket.params)
        except Exception as e:  # noqa: BLE001 - the request's own error goes back to its client
            self._finish(ticket, e)
            return
        self._live[ticket.request.id] = ticket

    def _step(self) -> None:
        try:
            events = self.engine.step()
            self.steps += 1
        except Exception as e:  # noqa: BLE001 - every request in the batch gets it; the server stays up
            logger.error("model %s: engine step failed, failing %d request(s): %s", self.name, len(self._live), e)
            for ticket in list(self._live.values()):
                if ticket.request.spec is not None:
                    ticket.request.spec.close()  # its draft-model cache, which the ticket would keep alive
                self._finish(ticket, e)
            self.engine = self._new_engine()
            self.cache_bytes = self._cache_bytes()  # the prefix cache outlives the failed engine
            return
        for event in events:
            ticket = self._live.get(event.request_id)
            if ticket is None:
                continue
            if event.finish_reason is not None:
                self._finish(ticket, event)
            else:
                self._send(ticket, event)
        self.cache_bytes = self._cache_bytes()

    def _cache_bytes(self) -> int:
        """The engine's KV cache, the draft-model caches of its requests (speculation with a draft model: one per
        request, on the draft model's backend) and the prefix cache's blocks."""
        drafts = sum(r.spec.drafter.nbytes for r in self.engine.active if r.spec is not None)
        return self.engine.cache_bytes + drafts + (self.prefix_cache.nbytes if self.prefix_cache else 0)

    def _send(self, ticket: Ticket, item) -> None:
        try:
            ticket.sink(item)
        except Exception as e:  # noqa: BLE001 - e.g. the event loop already closed at shutdown
            logger.debug("model %s: dropping an event: %s", self.name, e)

    def _finish(self, ticket: Ticket, item) -> None:
        if ticket.request is not None:
            self._live.pop(ticket.request.id, None)
        with self._cond:
            ticket.done = True
            self.in_flight -= 1
        self._send(ticket, item)
