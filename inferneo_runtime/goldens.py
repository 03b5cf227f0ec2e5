"""Re-checking a build's goldens on this host.

A float32 target must reproduce the reference's greedy tokens exactly. A reduced-precision target is judged the
way the build judged it, by a tolerance: teacher-forced over each golden (its prompt followed by the reference's
greedy tokens), the share of generated positions where this host's argmax is the reference's token must reach the
target's `top1_agreement`. Its exact greedy tokens are compared too, but only reported: onnxruntime's quantized
kernels differ by instruction set (cpu_kernels.py), so another CPU may legitimately pick another token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .backends.base import Backend


def prefill_logits(backend: Backend, ids: Sequence[int]) -> np.ndarray:
    """Every position's logits [len(ids), vocab] from one prefill into a fresh cache."""
    array = np.asarray(ids, dtype=np.int64)[None, :]
    cache = backend.allocate_cache(1, array.shape[1])
    return np.asarray(backend.forward(cache, 0, array, np.zeros(1, dtype=np.int64))[0], dtype=np.float32)


def teacher_forced_agreement(backend: Backend, prompt_ids: Sequence[int], tokens: Sequence[int]) -> tuple[int, int]:
    """(positions whose argmax is the golden's token, positions) over the golden's generated tokens."""
    if not tokens:
        return 0, 0
    ids = list(prompt_ids) + list(tokens[:-1])
    logits = prefill_logits(backend, ids)[len(prompt_ids) - 1:]
    if not np.all(np.isfinite(logits)):
        return 0, len(tokens)
    return int(np.sum(logits.argmax(-1) == np.asarray(tokens))), len(tokens)
