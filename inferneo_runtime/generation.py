"""The one decode loop: every backend, build-time validation and the server run through it.

Each prompt gets a slot in a runtime-owned KV cache. A prompt is prefilled once into its slot, then all
active slots decode together, one token per step. Active slots are kept contiguous [0, n): when a
sequence finishes, the last active slot is moved into its place, so finished sequences cost nothing
and a waiting prompt takes the freed slot at the next step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .backends.base import Backend
from .errors import RequestError


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")


@dataclass
class SequenceOutput:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (EOS / stop token) or "length"
    prompt_logits: Optional[np.ndarray] = None  # [prompt_len, vocab], only with keep_logits
    step_logits: list[np.ndarray] = field(default_factory=list)  # logits each token was chosen from


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which prompt
    token_id: int
    finish_reason: Optional[str]  # set on the sequence's last token


class _Sequence:
    __slots__ = ("index", "out", "past", "params", "stop_ids")

    def __init__(self, index: int, prompt: list[int], params: GenerationParams, eos_ids: frozenset[int]):
        self.index = index
        self.out = SequenceOutput(prompt_ids=list(prompt))
        self.past = 0
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)

    def accept(self, logits_row: np.ndarray, keep_logits: bool) -> TokenEvent:
        token = int(np.argmax(logits_row))
        if keep_logits:
            self.out.step_logits.append(np.array(logits_row, dtype=np.float32))
        self.out.token_ids.append(token)
        if token in self.stop_ids:
            self.out.finish_reason = "stop"
        elif len(self.out.token_ids) >= self.params.max_new_tokens:
            self.out.finish_reason = "length"
        return TokenEvent(self.index, token, self.out.finish_reason)


def check_fits(backend: Backend, prompts: Sequence[Sequence[int]], params: GenerationParams) -> None:
    bounds = backend.target.shapes
    limit = bounds.max_sequence if bounds else backend.dims.max_positions
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RequestError(f"prompt {i} is empty after tokenization")
        if len(p) + params.max_new_tokens > limit:
            raise RequestError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that is "
                               f"{len(p) + params.max_new_tokens}, over the artifact's max_sequence {limit}")


def stream_tokens(backend: Backend, prompts: Sequence[Sequence[int]], params: GenerationParams,
                  eos_ids: Sequence[int] = (), keep_logits: bool = False,
                  outputs: Optional[list[SequenceOutput]] = None) -> Iterator[TokenEvent]:
    """Yield each generated token as it is chosen. `outputs`, if given, is filled with one entry per prompt."""
    check_fits(backend, prompts, params)
    eos = frozenset(int(e) for e in eos_ids)
    seqs = [_Sequence(i, list(p), params, eos) for i, p in enumerate(prompts)]
    if outputs is not None:
        outputs[:] = [s.out for s in seqs]
    bounds = backend.target.shapes
    slots = min(len(seqs), bounds.max_batch if bounds else len(seqs))
    cache = backend.allocate_cache(slots, max(len(p) for p in prompts) + params.max_new_tokens)
    waiting = deque(seqs)
    active: list[_Sequence] = []  # active[i] lives in cache slot i

    while waiting or active:
        while waiting and len(active) < slots:  # admit: prefill into the next free slot
            seq = waiting.popleft()
            prompt = np.asarray(seq.out.prompt_ids, dtype=np.int64)[None, :]
            logits = backend.forward(cache, len(active), prompt, np.zeros(1, dtype=np.int64))
            seq.past = prompt.shape[1]
            if keep_logits:
                seq.out.prompt_logits = np.array(logits[0], dtype=np.float32)
            event = seq.accept(logits[0, -1], keep_logits)
            yield event
            if event.finish_reason is None:
                active.append(seq)
        if not active:
            continue

        last_tokens = np.fromiter((s.out.token_ids[-1] for s in active), dtype=np.int64, count=len(active))
        past = np.fromiter((s.past for s in active), dtype=np.int64, count=len(active))
        logits = backend.forward(cache, 0, last_tokens[:, None], past)
        finished = []
        for row, seq in enumerate(active):
            seq.past += 1
            event = seq.accept(logits[row, -1], keep_logits)
            yield event
            if event.finish_reason is not None:
                finished.append(row)
        for row in reversed(finished):  # swap the last active slot into each freed one
            last = len(active) - 1
            if row != last:
                cache.copy_slot(last, row, length=active[last].past)
                active[row] = active[last]
            active.pop()


def generate_ids(backend: Backend, prompts: Sequence[Sequence[int]], params: GenerationParams,
                 eos_ids: Sequence[int] = (), keep_logits: bool = False) -> list[SequenceOutput]:
    outputs: list[SequenceOutput] = []
    for _ in stream_tokens(backend, prompts, params, eos_ids, keep_logits, outputs):
        pass
    return outputs
