"""The one decode loop: every backend, build-time validation and the server run through it.

Each request gets a slot in a runtime-owned KV cache. A prompt is prefilled once into its slot, then all
active slots decode together, one token per step. Active slots stay contiguous [0, n): when a sequence
finishes, the last active slot moves into its place, so finished sequences cost nothing and a waiting
request takes a free slot at the next step (continuous batching).

A prompt whose leading blocks are in the prefix cache (prefix_cache.py) starts from a copy of their keys and
values and prefills only the rest. With a prefill budget (`prefill_chunk`), a step prefills at most that many
prompt tokens: a long prompt is prefilled over several steps, in the slot after the active ones, while the
active slots keep decoding one step each time. Where the backend can (`Backend.mixes_steps`: onnx targets with
a mixed-step graph), a step's chunk runs in the same forward as the active slots' decode: one pass over the
weights instead of two.

With speculation (speculative.py), a step feeds each slot its last token plus the tokens its drafter
proposed, keeps the drafts the sampler agrees with (sampling.verify_draft) and one more token, and
leaves the slot's length at what it kept: the rejected positions are overwritten by the next step. A draft
model (speculative method "draft") comes from `draft_backend`, which loads it once for all requests.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .backends.base import Backend, KVCache
from .detokenize import StopStringDetokenizer
from .errors import RequestError
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, TokenLogprobs, changes_logits, choose_token, token_logprobs, verify_draft
from .structured import compile_constraint, sequence_constraint
from .speculative import Drafter, SpeculationState, SpeculationStats, SpeculativeConfig, make_drafter, speculative_config
from .tokenizer import Tokenizer

GenerationParams = SamplingParams  # the name the foundation API used
ENGINE_DEFAULT = "default"  # a request's `speculative` when it follows the engine's setting


@dataclass
class SequenceOutput:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # filled when the engine has a tokenizer
    finish_reason: Optional[str] = None  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logits: Optional[np.ndarray] = None  # [prompt_len, vocab], only with keep_logits
    # with params.prompt_logprobs: per prompt token, its logprobs given the tokens before it (None for the first)
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    step_logits: list[np.ndarray] = field(default_factory=list)  # logits each token was chosen from


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token_id: int
    text: str  # newly final text (may be empty while a stop string or UTF-8 sequence is pending)
    finish_reason: Optional[str]  # set on the request's last event
    logprobs: Optional[TokenLogprobs] = None
    # on a request's first event, with params.prompt_logprobs: SequenceOutput.prompt_logprobs
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None


class Request:
    def __init__(self, request_id: int, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: frozenset[int],
                 tokenizer: Optional[Tokenizer], speculative: Optional[SpeculativeConfig] = None,
                 drafter: Optional[Drafter] = None):
        self.id = request_id
        self.params = params
        self.out = SequenceOutput(prompt_ids=list(prompt_ids))
        self.past = 0
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        self.banned = np.fromiter(sorted(self.stop_ids), dtype=np.int64) if self.stop_ids else np.zeros(0, np.int64)
        self.rng = np.random.default_rng(params.seed)
        self.detok = (StopStringDetokenizer(tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output,
                                            params.skip_special_tokens) if tokenizer else None)
        self.cancelled = False
        self.prompt_logits: list[np.ndarray] = []  # per prefill chunk, with keep_logits
        if params.prompt_logprobs is not None:
            self.out.prompt_logprobs = [None]  # the first token has nothing before it
        self.spec = SpeculationState(speculative, drafter) if speculative is not None else None
        # structured outputs: the grammar's matcher (Engine.add turns speculation off for these requests)
        self.constraint = (sequence_constraint(params.constraint, tokenizer, eos_ids)
                           if params.constraint is not None else None)

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    def draft(self) -> tuple[list[int], Optional[np.ndarray]]:
        """Tokens to verify after the last one (none without speculation); at most as many as may still be
        emitted after one more, so a step never writes past the request's own positions."""
        if self.spec is None:
            return [], None
        out = self.out
        room = self.params.max_new_tokens - len(out.token_ids) - 1
        return self.spec.draft(out.prompt_ids + out.token_ids, room) if room > 0 else ([], None)

    def _banned(self) -> Sequence[int]:
        # a grammar decides alone when the output may end (min_new_tokens' EOS ban could leave no token allowed)
        if len(self.out.token_ids) < self.params.min_new_tokens and self.constraint is None:
            return self.banned
        return ()

    @property
    def token_is_enough(self) -> bool:
        """Nothing but the sampler's filter and draw reads the logits (no bias, penalty, ban, grammar or
        logprobs): the backend may choose the token where the logits are (on a GPU, only it crosses to the host)."""
        p = self.params
        return p.logprobs is None and self.constraint is None and not changes_logits(p, self._banned())

    def uniform(self) -> float:
        """The uniform `choose_token` would draw this step from the request's generator (greedy draws none)."""
        return 0.0 if self.params.greedy else self.rng.random()

    def accept(self, logits_row: np.ndarray, keep_logits: bool, draft: Optional[int] = None,
               draft_probs: Optional[np.ndarray] = None) -> TokenEvent:
        """Choose the next token from `logits_row`; with a `draft`, by the rejection rule (it is kept iff the
        event's token equals it)."""
        p, out = self.params, self.out
        banned = self._banned()
        context = out.prompt_ids + out.token_ids
        if self.constraint is not None:
            token = choose_token(logits_row, p, self.rng, context, out.token_ids, banned,
                                 self.constraint.allowed(logits_row.shape[-1]))
            self.constraint.advance(token)
        elif draft is None:
            token = choose_token(logits_row, p, self.rng, context, out.token_ids, banned)
        else:
            token = verify_draft(logits_row, p, self.rng, context, out.token_ids, draft, draft_probs, banned)
        lp = token_logprobs(logits_row, token, p.logprobs) if p.logprobs is not None else None
        if lp is not None:
            out.logprobs.append(lp)
        if keep_logits:
            out.step_logits.append(np.array(logits_row, dtype=np.float32))
        return self.emit(token, lp)

    def emit(self, token: int, lp: Optional[TokenLogprobs] = None) -> TokenEvent:
        """Append the chosen token: stops, detokenized text, the finish reason, the event."""
        out = self.out
        p = self.params
        out.token_ids.append(token)
        text = ""
        if token in self.stop_ids:
            out.finish_reason = "stop"
        elif self.detok is not None:
            text = self.detok.push(token)
            if self.detok.stopped:
                out.finish_reason = "stop"
        if out.finish_reason is None and self.constraint is not None and self.constraint.finished:
            out.finish_reason = "stop"  # the grammar is complete: only EOS could follow
        if out.finish_reason is None and len(out.token_ids) >= p.max_new_tokens:
            out.finish_reason = "length"
        if out.finish_reason is not None and self.detok is not None:
            text += self.detok.finish()
            out.text = self.detok.text
        elif self.detok is not None:
            out.text = self.detok.text
        first = len(out.token_ids) == 1 and out.prompt_logprobs is not None
        return TokenEvent(self.id, token, text, out.finish_reason, lp, out.prompt_logprobs if first else None)

    def score_prompt(self, logits: np.ndarray, start: int) -> None:
        """Prompt logprobs from one prefill chunk: `logits[j]` (position start + j) predicts token start + j + 1."""
        prompt, k = self.out.prompt_ids, self.params.prompt_logprobs
        for j in range(min(len(logits), len(prompt) - 1 - start)):
            self.out.prompt_logprobs.append(token_logprobs(logits[j], prompt[start + j + 1], k))


class Engine:
    """Admits requests into cache slots and advances all of them one token per `step()`."""

    def __init__(self, backend: Backend, eos_ids: Sequence[int] = (), tokenizer: Optional[Tokenizer] = None,
                 keep_logits: bool = False, speculative=None, spec_stats: Optional[SpeculationStats] = None,
                 prefix_cache: Optional[PrefixCache] = None, prefill_chunk: Optional[int] = None,
                 draft_backend: Optional[Callable[[str], Backend]] = None, mixed_steps: bool = True):
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise RequestError(f"prefill_chunk={prefill_chunk!r} is invalid: must be an integer >= 1 (or None: no limit)")
        self.backend = backend
        # prompt logits must cover every position, so a keep_logits engine (validation) computes them all
        self.prefix_cache = prefix_cache if not keep_logits else None
        self.prefill_chunk = prefill_chunk  # most prompt tokens prefilled per step (None: whole prompts)
        # a chunk runs in the running rows' decode forward where the backend can (False: apart, to compare)
        self.mixed_steps = mixed_steps
        if prefill_chunk is not None and mixed_steps:
            backend.prepare_mixed_steps()
        self.speculative = speculative_config(speculative)  # the default of requests that do not choose
        self.spec_stats = spec_stats if spec_stats is not None else SpeculationStats()
        self.draft_backend = draft_backend  # name -> the loaded draft model's backend (Model.draft_backend)
        if self.speculative is not None:
            self._drafter(self.speculative)  # a default draft model loads now: a bad one fails here, not per request
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.tokenizer = tokenizer
        self.keep_logits = keep_logits
        bounds = backend.target.shapes
        self.max_batch = bounds.max_batch if bounds else 1
        self.max_sequence = bounds.max_sequence if bounds else backend.dims.max_positions
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # active[i] lives in cache slot i
        self.prefilling: Optional[Request] = None  # a prompt part-way through prefill, in slot len(active)
        self._prefill_slot = 0
        self.cache: Optional[KVCache] = None
        self._ids = itertools.count()
        # LongRoPE: a forward call longer than this rotates all its tokens with the long factors (backends/base.py)
        self.rope_switch = getattr(backend, "rope_switch", None)

    # -- requests ---------------------------------------------------------------------------------
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if len(prompt_ids) == 0:
            raise RequestError("the prompt is empty after tokenization")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_sequence:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} = {total} "
                               f"exceeds the artifact's max_sequence {self.max_sequence}")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer")
        vocab = getattr(self.backend.dims, "vocab", None)
        if vocab and any(t >= vocab for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias: a token id is outside the model's vocabulary [0, {vocab})")
        if params.constraint is not None:
            if self.tokenizer is None:
                raise RequestError("structured outputs (response_format, guided_*) need a tokenizer")
            compile_constraint(params.constraint, self.tokenizer, self.eos_ids)  # cached; add() then only copies it

    def add(self, prompt_ids: Sequence[int], params: SamplingParams, speculative=ENGINE_DEFAULT) -> Request:
        """Queue a request. `speculative`: this request's setting (see speculative.speculative_config), or the engine's."""
        self.check(prompt_ids, params)
        spec = self.speculative if speculative is ENGINE_DEFAULT else speculative_config(speculative)
        k = params.speculative_tokens
        if k is not None:  # the request's own number of draft tokens (0: off), with the engine's drafter settings
            spec = replace(spec or SpeculativeConfig(), num_tokens=k) if k else None
        if params.constraint is not None:
            # Structured outputs do not speculate: drafts would need the grammar rolled back on rejection; the
            # simplest correct rule is one masked token per step for these requests.
            spec = None
        drafter = self._drafter(spec) if spec is not None else None
        req = Request(next(self._ids), prompt_ids, params, self.eos_ids, self.tokenizer, spec, drafter)
        self.waiting.append(req)
        return req

    def _drafter(self, spec: SpeculativeConfig) -> Drafter:
        return make_drafter(spec, self.draft_backend, self.backend.dims.vocab)

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away); its slot is freed at the next step."""
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            request.out.finish_reason = "cancelled"  # as a prefilling or active one ends at the next step

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self.prefilling)

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    # -- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._drop_cancelled()
        chunk = self._prefill(events)
        if self.active:
            self._decode(events, chunk)
        if not self.has_work:
            self.cache = None  # idle: give the cache memory back
        return events

    def _ensure_cache(self, slots: int, positions: int) -> KVCache:
        if self.cache is None:
            self.cache = self.backend.allocate_cache(slots, positions)
        else:  # only the active slots hold keys and values, each up to its length
            self.cache.ensure(slots, positions, keep=max((r.past for r in self.active), default=0))
        return self.cache

    def _prefill(self, events: list[TokenEvent]) -> Optional[np.ndarray]:
        """Prefill waiting prompts into free slots, within this step's budget of prompt tokens. Returns a chunk
        [1, c] of the prefilling prompt that the decode step runs in the same forward (`Backend.mixes_steps`),
        or None."""
        budget = self.prefill_chunk or float("inf")
        while budget > 0:
            req = self.prefilling
            if req is None:
                if not self.waiting or len(self.active) >= self.max_batch:
                    return None
                req = self._start(self.waiting.popleft())
            slot, prompt = len(self.active), req.out.prompt_ids
            if self._prefill_slot != slot:  # active slots were freed below it
                self.cache.copy_slot(self._prefill_slot, slot, length=req.past)
                self._prefill_slot = slot
            take = int(min(budget, len(prompt) - req.past))
            switch = self.rope_switch
            if switch is not None and len(prompt) > switch and req.past + take <= switch:
                # LongRoPE: the whole prompt's call rotates every token with the long factors; a chunk that ended
                # before the switch would rotate its own with the short ones. The first chunk runs past it.
                take = switch + 1 - req.past
            chunk = np.asarray(prompt[req.past:req.past + take], dtype=np.int64)[None, :]
            scored = req.params.prompt_logprobs is not None
            if self._mixes(scored):
                return chunk
            logits = self.backend.forward(self.cache, slot, chunk, np.array([req.past], dtype=np.int64),
                                          last_only=not (self.keep_logits or scored))
            if scored:
                req.score_prompt(logits[0], req.past)
            budget -= take
            self._prefilled(req, take, logits, events)
        return None

    def _mixes(self, scored: bool) -> bool:
        """Whether the chunk just cut runs in the decode step's forward: the active rows decode one token each
        (no drafts) and nothing reads the chunk's logits but for its last position."""
        return (self.mixed_steps and self.backend.mixes_steps and bool(self.active) and not (self.keep_logits or scored)
                and all(r.spec is None for r in self.active))

    def _prefilled(self, req: Request, take: int, logits: np.ndarray, events: list[TokenEvent]) -> None:
        """`take` more prompt tokens of `req` are in its slot (len(active)); `logits` [1, S, vocab] end with the
        last one's. A complete prompt gives its first token and joins the active slots."""
        req.past += take
        if self.keep_logits:
            req.prompt_logits.append(np.array(logits[0], dtype=np.float32))
        prompt = req.out.prompt_ids
        if req.past < len(prompt):
            return  # the budget ran out mid-prompt; the next step goes on
        self.prefilling = None
        if self.prefix_cache is not None:
            self.prefix_cache.store(self.cache, len(self.active), prompt, req.past, self._rope_salt(len(prompt)))
        if self.keep_logits:
            req.out.prompt_logits = np.concatenate(req.prompt_logits)
            req.prompt_logits = []
        events.append(req.accept(logits[0, -1], self.keep_logits))
        if not req.finished:
            self.active.append(req)

    def _start(self, req: Request) -> Request:
        """Give `req` the slot after the active ones, room for its whole generation, and its cached prefix."""
        slot = len(self.active)
        need = len(req.out.prompt_ids) + req.params.max_new_tokens
        # room for this request's whole generation now, so the cache does not regrow every chunk
        cache = self._ensure_cache(min(self.max_batch, slot + 1 + len(self.waiting)), need)
        # a prompt whose logprobs are asked for is prefilled whole: cached keys/values come without logits
        reuse = self.prefix_cache is not None and req.params.prompt_logprobs is None
        prompt = req.out.prompt_ids
        req.past = self.prefix_cache.load(cache, slot, prompt, self._rope_salt(len(prompt))) if reuse else 0
        self.prefilling, self._prefill_slot = req, slot
        return req

    def _decode(self, events: list[TokenEvent], chunk: Optional[np.ndarray] = None) -> None:
        """One step of the active slots; with `chunk`, the prefilling prompt's next chunk in the same forward."""
        n = len(self.active)
        past = np.fromiter((r.past for r in self.active), dtype=np.int64, count=n)
        # A backend that verifies several tokens per row only one row at a time (onnx) would turn one batched
        # pass into n passes: there, requests speculate while they run alone.
        drafts = [r.draft() for r in self.active] if n == 1 or self.backend.multi_token_batches else [([], None)] * n
        # every row is padded to the widest draft, so the padding of the row with the longest sequence must
        # still fit within max_sequence (the cache's bound): cut the drafts to what that row has room for
        fit = self.max_sequence - int(past.max()) - 1
        if self.rope_switch is not None and (past < self.rope_switch).any():
            # LongRoPE: a row decoding alone rotates a token at position p with the long factors iff p >= switch,
            # while one call rotates all its tokens alike: a call before the switch must end there
            fit = min(fit, self.rope_switch - int(past[past < self.rope_switch].max()) - 1)
        drafts = [(d[:fit], None if q is None else q[:fit]) if len(d) > fit else (d, q) for d, q in drafts]
        width = 1 + max(len(d) for d, _ in drafts)
        ids = np.empty((n, width), dtype=np.int64)
        for row, (req, (draft, _)) in enumerate(zip(self.active, drafts)):
            ids[row, 0] = req.out.token_ids[-1]
            ids[row, 1:1 + len(draft)] = draft
            ids[row, 1 + len(draft):] = ids[row, 0]  # padding: its positions are past the row's length, never read
        if chunk is not None:
            req = self.prefilling
            logits, chunk_logits = self.backend.forward_mixed(self.cache, ids, past, n, chunk, req.past)
            self._prefilled(req, chunk.shape[1], chunk_logits, events)  # a complete prompt joins as row n
        elif width == 1 and not self.keep_logits and all(r.token_is_enough for r in self.active):
            # nothing reads the logits but the draw: the backend chooses where they are (a GPU returns the tokens)
            params = [r.params for r in self.active]
            uniforms = np.array([r.uniform() for r in self.active])
            for req, token in zip(self.active, self.backend.forward_tokens(self.cache, 0, ids, past, params, uniforms)):
                req.past += 1
                events.append(req.emit(int(token)))
            self._compact([row for row, r in enumerate(self.active) if r.finished])
            return
        else:
            logits = self.backend.forward(self.cache, 0, ids, past)
        for row, (req, (draft, probs)) in enumerate(zip(self.active[:n], drafts)):
            req.past += 1  # the last token is in the cache now
            kept = 0
            for i, token in enumerate(draft):
                event = req.accept(logits[row, i], self.keep_logits, token, None if probs is None else probs[i])
                events.append(event)
                if event.token_id != token:
                    break
                # kept, even when it ends the request (a stop inside the draft): counted before leaving the loop
                kept += 1
                req.past += 1  # the draft's keys/values, written by this step, stay
                if req.finished:
                    break
            else:
                events.append(req.accept(logits[row, len(draft)], self.keep_logits))
            if draft:
                req.spec.update(len(draft), kept)
                stats = self.spec_stats
                stats.drafted, stats.accepted = stats.drafted + len(draft), stats.accepted + kept
        if any(draft for draft, _ in drafts):  # one verify forward, however many of its rows drafted
            self.spec_stats.steps += 1
        self._compact([row for row, r in enumerate(self.active) if r.finished])

    def _rope_salt(self, prompt: int) -> bytes:
        """The prefix cache's salt for a prompt of this many tokens: LongRoPE prefills a prompt longer than its
        switch with the long factors, so its cached keys are not a shorter prompt's (b"" for other models)."""
        return b"long" if self.rope_switch is not None and prompt > self.rope_switch else b""

    def _drop_cancelled(self) -> None:
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling.out.finish_reason = "cancelled"
            self.prefilling = None
        rows = [row for row, r in enumerate(self.active) if r.cancelled]
        for row in rows:
            self.active[row].out.finish_reason = self.active[row].out.finish_reason or "cancelled"
        self._compact(rows)

    def _compact(self, rows: list[int]) -> None:
        for row in reversed(rows):  # move the last active slot into each freed one
            req = self.active[row]
            if req.spec is not None:
                req.spec.close()  # its draft model's cache
            if self.prefix_cache is not None and req.out.finish_reason != "cancelled":
                # a chat's next turn starts with this one's prompt and answer
                length, prompt = req.past, len(req.out.prompt_ids)
                if self.rope_switch is not None and prompt <= self.rope_switch:
                    length = min(length, self.rope_switch)  # LongRoPE: the positions rotated as a short prompt's
                self.prefix_cache.store(self.cache, row, req.out.prompt_ids + req.out.token_ids, length,
                                        self._rope_salt(prompt))
            last = len(self.active) - 1
            if row != last:
                self.cache.copy_slot(last, row, length=self.active[last].past)
                self.active[row] = self.active[last]
            self.active.pop()


def _as_list(params: Union[SamplingParams, Sequence[SamplingParams]], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise RequestError(f"{len(params)} parameter sets for {n} prompts")
    return params


def stream_tokens(backend: Backend, prompts: Sequence[Sequence[int]],
                  params: Union[SamplingParams, Sequence[SamplingParams]], eos_ids: Sequence[int] = (),
                  keep_logits: bool = False, outputs: Optional[list[SequenceOutput]] = None,
                  tokenizer: Optional[Tokenizer] = None, speculative=None,
                  spec_stats: Optional[SpeculationStats] = None, prefix_cache: Optional[PrefixCache] = None,
                  prefill_chunk: Optional[int] = None,
                  draft_backend: Optional[Callable[[str], Backend]] = None) -> Iterator[TokenEvent]:
    """Yield each token event as it is produced; event.request_id is the prompt's index.
    `outputs`, if given, is filled with one SequenceOutput per prompt (complete once the iterator ends).
    `speculative`: see speculative.speculative_config; `spec_stats`, if given, counts drafted and kept tokens.
    `prefix_cache` (shared across calls), `prefill_chunk` and `draft_backend`: see Engine."""
    engine = Engine(backend, eos_ids, tokenizer, keep_logits, speculative, spec_stats, prefix_cache, prefill_chunk,
                    draft_backend)
    plist = _as_list(params, len(prompts))
    for p, sp in zip(prompts, plist):
        engine.check(p, sp)  # every request is checked before any compute
    requests = [engine.add(p, sp) for p, sp in zip(prompts, plist)]
    if outputs is not None:
        outputs[:] = [r.out for r in requests]
    while engine.has_work:
        yield from engine.step()


def generate_ids(backend: Backend, prompts: Sequence[Sequence[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams]], eos_ids: Sequence[int] = (),
                 keep_logits: bool = False, tokenizer: Optional[Tokenizer] = None, speculative=None,
                 spec_stats: Optional[SpeculationStats] = None, prefix_cache: Optional[PrefixCache] = None,
                 prefill_chunk: Optional[int] = None,
                 draft_backend: Optional[Callable[[str], Backend]] = None) -> list[SequenceOutput]:
    outputs: list[SequenceOutput] = []
    for _ in stream_tokens(backend, prompts, params, eos_ids, keep_logits, outputs, tokenizer, speculative, spec_stats,
                           prefix_cache, prefill_chunk, draft_backend):
        pass
    return outputs
