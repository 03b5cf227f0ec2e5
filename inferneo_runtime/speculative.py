"""Speculative decoding's drafters and per-request state; the generation loop verifies what they propose.

A drafter guesses the next few tokens of a sequence cheaply. The loop feeds the last token plus the k
drafted ones through the target model in one forward (k+1 positions), keeps the longest prefix the
sampler agrees with (`sampling.verify_draft`), and emits one more token from the first position it did not
keep. The cache positions of rejected drafts are simply overwritten by the next step. So greedy output is
the target's own greedy output, and sampled output has the target's distribution, whatever was drafted.

    spec = SpeculativeConfig(method="ngram", num_tokens=4)
    model.generate(prompt, speculative=spec)    # or speculative="ngram"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import RequestError

METHODS = ("ngram",)
MAX_TOKENS = 16
MAX_SKIP = 32  # steps a request waits, at most, before drafting again after drafts kept being rejected


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate. `num_tokens` is the most tokens drafted per step (the drafter may propose fewer,
    and a request drafts fewer after rejections). ngram: match the last max_ngram..min_ngram tokens
    against earlier text (prompt and output) and propose what followed its latest occurrence."""

    method: str = "ngram"
    num_tokens: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise RequestError(f"speculative method {self.method!r} is unknown; known: {', '.join(METHODS)}")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= MAX_TOKENS:
            raise RequestError(f"speculative num_tokens={self.num_tokens!r} is invalid: must be an integer in [1, {MAX_TOKENS}]")
        if not isinstance(self.min_ngram, int) or not isinstance(self.max_ngram, int) or not 1 <= self.min_ngram <= self.max_ngram:
            raise RequestError(f"speculative n-gram sizes min_ngram={self.min_ngram!r}, max_ngram={self.max_ngram!r} "
                               f"are invalid: need 1 <= min_ngram <= max_ngram")


def speculative_config(spec: Union[None, bool, str, int, dict, SpeculativeConfig]) -> Optional[SpeculativeConfig]:
    """The config for what users write: None/False/0 = off, "ngram", an int (n-gram with that many tokens),
    a dict of SpeculativeConfig fields, or a SpeculativeConfig."""
    if spec is None or spec is False or spec == 0 or spec == "off" or spec == "none":
        return None
    if isinstance(spec, SpeculativeConfig):
        return spec
    if spec is True:
        return SpeculativeConfig()
    if isinstance(spec, int):
        return SpeculativeConfig(num_tokens=spec)
    if isinstance(spec, str):
        return SpeculativeConfig(method=spec)
    if isinstance(spec, dict):
        unknown = set(spec) - {"method", "num_tokens", "max_ngram", "min_ngram"}
        if unknown:
            raise RequestError(f"speculative: unknown field(s) {sorted(unknown)}; known: method, num_tokens, max_ngram, min_ngram")
        return SpeculativeConfig(**spec)
    raise RequestError(f"speculative={spec!r} is invalid: use 'ngram', a number of tokens, or off")


class Drafter:
    """Proposes up to k next tokens for a sequence. `probs` is the drafter's distribution per proposed
    token ([k, vocab]), or None when it proposes them with certainty (what verify_draft then assumes)."""

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], Optional[np.ndarray]]:
        raise NotImplementedError


class NgramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n tokens."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # longest match first: it predicts best

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        ids = np.asarray(tokens, dtype=np.int64)
        for n in self.sizes:
            if len(ids) <= n:
                continue
            # windows starting before len-n, so that at least one token follows each
            windows = sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ids[start:start + k].tolist(), None
        return [], None


def make_drafter(config: SpeculativeConfig) -> Drafter:
    return NgramDrafter(config.max_ngram, config.min_ngram)


class SpeculationState:
    """One request's drafter and its back-off: after a rejection it drafts only as far as was kept plus one,
    after a fully rejected draft it waits 1, 3, 7, ... steps before drafting again; full acceptance widens."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.drafter = make_drafter(config)
        self.width = config.num_tokens
        self.skip = 0
        self.misses = 0

    def draft(self, tokens: Sequence[int], room: int) -> tuple[list[int], Optional[np.ndarray]]:
        """Up to min(width, room) drafted tokens (none while backing off)."""
        if self.skip:
            self.skip -= 1
            return [], None
        k = min(self.width, room)
        return self.drafter.propose(tokens, k) if k > 0 else ([], None)

    def update(self, proposed: int, kept: int) -> None:
        if not proposed:
            return
        if kept == proposed:
            self.width = min(self.config.num_tokens, self.width + 1)
            self.misses = 0
            return
        self.width = kept + 1
        if kept == 0:
            self.misses += 1
            self.skip = min((1 << self.misses) - 1, MAX_SKIP)
        else:
            self.misses = 0


@dataclass
class SpeculationStats:
    """Counts across requests (for /metrics and bench): drafted tokens, and how many the target kept."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify forwards that carried at least one draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
