"""Sampling parameters and pure functions from logits to a token (numpy, no device sync, no state but the RNG).

Order of processing, as vLLM and transformers do it: logit_bias → penalties → min_new_tokens mask → temperature →
top-k → top-p → min-p → draw. `logprobs` are the model's own log-softmax (before any processing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .errors import RequestError

if TYPE_CHECKING:
    from .structured import Constraint

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation. Names follow the OpenAI / vLLM APIs; `temperature=0` is greedy."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0  # 0 (or -1) = no top-k
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top-n log-probabilities per generated token (0 = only the chosen one)
    # vLLM's prompt_logprobs: the same for every prompt token after the first (its logprob given what precedes it)
    prompt_logprobs: Optional[int] = None
    # tokens drafted per step by speculative decoding (0 = off); None = the engine's setting. Output is unchanged.
    speculative_tokens: Optional[int] = None
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the logits before anything else
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False  # vLLM: keep the matched stop string at the end of the text
    skip_special_tokens: bool = True  # vLLM: leave special tokens out of the output text
    # structured outputs (structured.Constraint): the grammar the output must match, as a per-step token mask
    constraint: Optional["Constraint"] = None

    def __post_init__(self):
        def bad(name, rule):
            raise RequestError(f"{name}={getattr(self, name)!r} is invalid: {rule}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", f"must be an integer between 0 and max_new_tokens ({self.max_new_tokens})")
        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "must be a non-negative integer")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.speculative_tokens is not None and (not isinstance(self.speculative_tokens, int)
                                                    or not 0 <= self.speculative_tokens <= 16):
            bad("speculative_tokens", "must be an integer in [0, 16] (0 = off)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        bias = tuple((int(t), float(b)) for t, b in (self.logit_bias.items() if isinstance(self.logit_bias, dict)
                                                      else self.logit_bias))
        if any(t < 0 or not -100 <= b <= 100 for t, b in bias):
            bad("logit_bias", "token ids must be >= 0 and biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams()  # temperature 0: the argmax


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first
    rank: int = 1  # the token's place in the distribution (1: the most likely)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def apply_penalties(logits: np.ndarray, params: SamplingParams, context: Sequence[int], generated: Sequence[int]) -> np.ndarray:
    """repetition_penalty over prompt + output (transformers' rule); presence/frequency over the output (OpenAI's)."""
    if params.repetition_penalty != 1.0 and len(context):
        ids = np.unique(np.asarray(context, dtype=np.int64))
        vals = logits[ids]
        logits[ids] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(generated):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return logits


def filter_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p (zeros where filtered out)."""
    x = logits.astype(np.float64) / params.temperature
    if params.top_k > 0 and params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x[x < kth] = -np.inf
    x -= x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if params.top_p < 1.0:
        probs = np.where(nucleus(probs, params.top_p), probs, 0.0)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def nucleus(probs: np.ndarray, top_p: float, candidates: int = 64) -> np.ndarray:
    """Top-p's mask: the smallest prefix of the tokens sorted by probability (stably: ties by id) whose mass
    reaches `top_p`, always at least the top token. Exactly what a full stable argsort finds, sorting only the
    likeliest `candidates` (every token at least as likely as the candidates-th, ties included: the sorted
    prefix itself), and 8 times more while their mass falls short. A language model's nucleus is usually a few
    tokens: 0.1 ms here against 4.3 ms for sorting SmolLM2's 49,152 (a flat distribution's costs as much)."""
    n = probs.size
    while True:
        if candidates >= n:
            order = np.argsort(-probs, kind="stable")
        else:
            likeliest = np.flatnonzero(probs >= np.partition(probs, n - candidates)[n - candidates])
            order = likeliest[np.argsort(-probs[likeliest], kind="stable")]
        last = int(np.searchsorted(np.cumsum(probs[order]), top_p, side="left"))
        if last < order.size or order.size == n:  # reached (or every token is in: keep them all)
            mask = np.zeros(n, dtype=bool)
            mask[order[:last + 1]] = True
            return mask
        candidates *= 8


def changes_logits(params: SamplingParams, banned: Sequence[int] = (), allowed: Optional[np.ndarray] = None) -> bool:
    """Whether anything stands between the model's logits and the sampler: logit_bias, a penalty, `banned` ids
    or a grammar's `allowed` mask (what `_processed` applies)."""
    return bool(params.logit_bias or params.repetition_penalty != 1.0 or params.presence_penalty
                or params.frequency_penalty or len(banned) or allowed is not None)


def _processed(logits: np.ndarray, params: SamplingParams, context: Sequence[int], generated: Sequence[int],
               banned: Sequence[int], allowed: Optional[np.ndarray] = None) -> np.ndarray:
    """The logits after logit_bias, penalties, the `banned` ids and the `allowed` mask (a grammar's: False = -inf),
    as a copy only when something changes them. The mask comes last, so no processing can revive a masked token."""
    if not changes_logits(params, banned, allowed):
        return logits
    x = np.array(logits, dtype=np.float32)
    if params.logit_bias:  # OpenAI adds the bias to the raw logits, so it steers greedy decoding too
        ids, bias = zip(*params.logit_bias)
        np.add.at(x, np.asarray(ids, dtype=np.int64), np.asarray(bias, dtype=np.float32))
    apply_penalties(x, params, context, generated)
    if len(banned):
        x[np.asarray(banned, dtype=np.int64)] = -np.inf
    if allowed is not None:
        x[~allowed] = -np.inf
    return x


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    # inverse-CDF draw with one uniform per step: the same seed gives the same tokens on every backend
    return draw_at(probs, rng.random())


def draw_at(probs: np.ndarray, u: float) -> int:
    """The token where the cumulative distribution passes `u` (in [0, 1)) of its mass."""
    idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return min(idx, probs.size - 1)


def draw_tokens(logits: np.ndarray, params: Sequence[SamplingParams], uniforms: np.ndarray) -> np.ndarray:
    """Each row's token from logits [n, vocab] that nothing processes (`changes_logits` is False for every row):
    greedy rows their argmax, the others `choose_token`'s draw when the request's generator gives `uniforms[row]`
    (greedy rows draw nothing). What a backend computes where its logits are; see torch_sampling for the GPU."""
    return np.array([int(np.argmax(row)) if p.greedy else draw_at(filter_probs(row, p), float(u))
                     for row, p, u in zip(logits, params, uniforms)], dtype=np.int64)


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, context: Sequence[int],
                 generated: Sequence[int], banned: Sequence[int] = (), allowed: Optional[np.ndarray] = None) -> int:
    """Pick the next token from one row of logits. `banned` ids (e.g. EOS before min_new_tokens) are excluded;
    `allowed` (a bool mask over the logits, structured outputs), if given, excludes every token it does not allow."""
    x = _processed(logits, params, context, generated, banned, allowed)
    if params.greedy:
        return int(np.argmax(x))
    return _draw(filter_probs(x, params), rng)


def verify_draft(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, context: Sequence[int],
                 generated: Sequence[int], draft: int, draft_probs: Optional[np.ndarray] = None,
                 banned: Sequence[int] = ()) -> int:
    """Speculative sampling's rejection rule: the next token, given a drafted one, distributed exactly as
    `choose_token` would draw it. The draft is kept (the returned token equals it) with probability
    min(1, p(draft) / q(draft)); otherwise the token is drawn from the residual max(0, p - q), renormalized.
    p is the sampler's distribution from these logits, q the drafter's (`draft_probs`; None = the drafter
    proposed `draft` with certainty, as n-gram lookup does). Greedy: the draft is kept iff it is the argmax."""
    x = _processed(logits, params, context, generated, banned)
    if params.greedy:
        return int(np.argmax(x))
    p = filter_probs(x, params)
    q_draft = 1.0 if draft_probs is None else float(draft_probs[draft])
    if q_draft > 0 and rng.random() * q_draft < p[draft]:
        return int(draft)
    if draft_probs is None:
        residual = p.copy()
        residual[draft] = 0.0
    else:
        residual = np.maximum(p - draft_probs, 0.0)
    if residual.sum() <= 0:  # p == q: a rejection has probability 0; draw from p (never reached in exact arithmetic)
        residual = p
    return _draw(residual / residual.sum(), rng)


def token_logprobs(logits: np.ndarray, token: int, top_n: int) -> TokenLogprobs:
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if top_n:
        best = np.argpartition(-lp, top_n - 1)[:top_n]
        best = best[np.argsort(-lp[best], kind="stable")]
        top = [(int(i), float(lp[i])) for i in best]
    rank = 1 + int(np.count_nonzero(lp > lp[token]))
    return TokenLogprobs(token_id=token, logprob=float(lp[token]), top=top, rank=rank)
