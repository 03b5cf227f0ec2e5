"""Speculative decoding's drafters and per-request state; the generation loop verifies what they propose.

A drafter guesses the next few tokens of a sequence cheaply. The loop feeds the last token plus the k
drafted ones through the target model in one forward (k+1 positions), keeps the longest prefix the
sampler agrees with (`sampling.verify_draft`), and emits one more token from the first position it did not
keep. The cache positions of rejected drafts are simply overwritten by the next step. So greedy output is
the target's own greedy output, and sampled output has the target's distribution, whatever was drafted.

Drafters: n-gram prompt lookup (NgramDrafter), or a second, smaller model drafting greedily (ModelDrafter),
e.g. the artifact's int4 target drafting for its fp32 one.

    spec = SpeculativeConfig(method="ngram", num_tokens=4)
    model.generate(prompt, speculative=spec)    # or speculative="ngram"
    model.generate(prompt, speculative={"method": "draft", "draft": "onnx-int4"})    # or "draft:onnx-int4"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import RequestError

if TYPE_CHECKING:  # annotations only
    from .backends.base import Backend, KVCache

METHODS = ("ngram", "draft")
FIELDS = ("method", "num_tokens", "max_ngram", "min_ngram", "draft")
MAX_TOKENS = 16
MAX_SKIP = 32  # steps a request waits, at most, before drafting again after drafts kept being rejected


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate. `num_tokens` is the most tokens drafted per step (the drafter may propose fewer,
    and a request drafts fewer after rejections). ngram: match the last max_ngram..min_ngram tokens
    against earlier text (prompt and output) and propose what followed its latest occurrence. draft: a
    smaller model named by `draft` (a target of the same artifact, e.g. "onnx-int4", or the path of another
    artifact with the same tokenizer) proposes its greedy continuation."""

    method: str = "ngram"
    num_tokens: int = 4
    max_ngram: int = 3
    min_ngram: int = 1
    draft: Optional[str] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise RequestError(f"speculative method {self.method!r} is unknown; known: {', '.join(METHODS)}")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= MAX_TOKENS:
            raise RequestError(f"speculative num_tokens={self.num_tokens!r} is invalid: must be an integer in [1, {MAX_TOKENS}]")
        if not isinstance(self.min_ngram, int) or not isinstance(self.max_ngram, int) or not 1 <= self.min_ngram <= self.max_ngram:
            raise RequestError(f"speculative n-gram sizes min_ngram={self.min_ngram!r}, max_ngram={self.max_ngram!r} "
                               f"are invalid: need 1 <= min_ngram <= max_ngram")
        if self.method == "draft" and not (isinstance(self.draft, str) and self.draft.strip()):
            raise RequestError(f"speculative method 'draft' needs `draft`, the model to draft with: a target of the "
                               f"same artifact (e.g. onnx-int4) or another artifact's path; got draft={self.draft!r}")
        if self.method != "draft" and self.draft is not None:
            raise RequestError(f"speculative draft={self.draft!r} is for method 'draft', not {self.method!r}")


def speculative_config(spec: Union[None, bool, str, int, dict, SpeculativeConfig]) -> Optional[SpeculativeConfig]:
    """The config for what users write: None/False/0 = off, "ngram", "draft:<target or artifact path>", an int
    (n-gram with that many tokens), a dict of SpeculativeConfig fields (a `draft` implies method "draft"), or a
    SpeculativeConfig."""
    if spec is None or spec is False or spec == 0 or spec == "off" or spec == "none":
        return None
    if isinstance(spec, SpeculativeConfig):
        return spec
    if spec is True:
        return SpeculativeConfig()
    if isinstance(spec, int):
        return SpeculativeConfig(num_tokens=spec)
    if isinstance(spec, str):
        method, colon, draft = spec.partition(":")  # "draft:onnx-int4"; the path may hold colons (s3://...)
        return SpeculativeConfig(method=method, draft=draft if colon else None)
    if isinstance(spec, dict):
        unknown = set(spec) - set(FIELDS)
        if unknown:
            raise RequestError(f"speculative: unknown field(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
        if spec.get("draft") is not None and "method" not in spec:
            spec = {**spec, "method": "draft"}
        return SpeculativeConfig(**spec)
    raise RequestError(f"speculative={spec!r} is invalid: use 'ngram', 'draft:<model>', a number of tokens, or off")


class Drafter:
    """Proposes up to k next tokens for a sequence. `probs` is the drafter's distribution per proposed
    token ([k, vocab]), or None when it proposes them with certainty (what verify_draft then assumes)."""

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], Optional[np.ndarray]]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of KV cache drafting holds for the request (a draft model's cache)."""
        return 0

    def close(self) -> None:
        """The request ended: give back what drafting held for it."""


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


class ModelDrafter(Drafter):
    """Greedy drafts from a second model (the draft backend, shared by all requests of a model). Each request has
    its own: a batch-1 KV cache on that backend, and the tokens the cache holds. A proposal reuses the longest
    common prefix of those and the sequence (the positions of rejected drafts are just overwritten), prefills
    the rest in one forward, then decodes k tokens by argmax. They come with certainty (probs None), which
    verify_draft's rejection rule accounts for, so sampled output keeps the target's distribution."""

    def __init__(self, backend: "Backend", vocab: Optional[int] = None):
        self.backend = backend
        # token ids both models have: the two may pad their vocabulary (embedding rows) to different sizes
        self.vocab = min(backend.dims.vocab, vocab or backend.dims.vocab)
        self.cache: Optional["KVCache"] = None
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds, position by position

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        tokens = list(tokens)
        if self.cache is None:
            self.cache = self.backend.allocate_cache(1, len(tokens) + k)
        # the cache holds the sequence and every draft but the last: stay within the draft model's positions
        k = min(k, self.cache.max_capacity + 1 - len(tokens))
        same = min(self._common_prefix(tokens), len(tokens) - 1)  # run at least one token: its logits draft
        rest = tokens[same:]
        if k <= 0 or max(rest) >= self.backend.dims.vocab:  # an id the draft model has no embedding for
            return [], None
        draft = [self._pick(self._forward(rest, same))]
        self.cached = tokens
        while len(draft) < k:
            token = self._next(draft[-1], len(self.cached))
            self.cached.append(draft[-1])
            draft.append(token)
        return draft, None

    def _pick(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits[:self.vocab]))

    def _next(self, token: int, past: int) -> int:
        """The draft after `token` at position `past`: one decode step (on a GPU, a replayed graph that returns
        only the token when the two models' vocabularies are the same size)."""
        if self.vocab == self.backend.dims.vocab:
            ids = np.array([[token]], dtype=np.int64)
            return int(self.backend.forward_tokens(self.cache, 0, ids, np.array([past], dtype=np.int64))[0])
        return self._pick(self._forward([token], past))

    def _forward(self, ids: list[int], past: int) -> np.ndarray:
        """The last position's logits after writing `ids` at positions past, past + 1, ..."""
        out = self.backend.forward(self.cache, 0, np.asarray([ids], dtype=np.int64), np.array([past], dtype=np.int64),
                                   last_only=True)
        return out[0, -1]

    def _common_prefix(self, tokens: list[int]) -> int:
        n = min(len(self.cached), len(tokens))
        differ = np.flatnonzero(np.asarray(self.cached[:n]) != np.asarray(tokens[:n]))
        return int(differ[0]) if differ.size else n

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def close(self) -> None:
        self.cache, self.cached = None, []


def make_drafter(config: SpeculativeConfig, draft_backend: Optional[Callable[[str], "Backend"]] = None,
                 vocab: Optional[int] = None) -> Drafter:
    """A request's drafter. `draft_backend(name)` gives the (shared, loaded) backend a "draft" config names;
    `vocab` is the target model's vocabulary size."""
    if config.method == "ngram":
        return NgramDrafter(config.max_ngram, config.min_ngram)
    if draft_backend is None:
        raise RequestError("speculative method 'draft' needs a loaded model to load its draft model from "
                           "(model.generate, inferneo generate or inferneo serve); this engine was given none")
    return ModelDrafter(draft_backend(config.draft), vocab)


class SpeculationState:
    """One request's drafter and its back-off: after a rejection it drafts only as far as was kept plus one,
    after a fully rejected draft it waits 1, 3, 7, ... steps before drafting again; full acceptance widens."""

    def __init__(self, config: SpeculativeConfig, drafter: Optional[Drafter] = None):
        self.config = config
        self.drafter = drafter if drafter is not None else make_drafter(config)
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

    def close(self) -> None:
        self.drafter.close()


@dataclass
class SpeculationStats:
    """Counts across requests (for /metrics and bench): drafted tokens, and how many the target kept."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify forwards that carried at least one draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
