"""Re-checking a build's goldens on this host.

A float32 target must reproduce the reference's greedy tokens exactly. A reduced-precision target is judged the
way the build judged it, by a tolerance: teacher-forced over each golden (its prompt followed by the reference's
greedy tokens), the share of generated positions where this host's argmax is the reference's token must reach the
target's `top1_agreement`. Its exact greedy tokens are compared too, but only reported: onnxruntime's quantized
kernels differ by instruction set (cpu_kernels.py), so another CPU may legitimately pick another token.
A target whose build validated a one-forward mixed step (onnx's mixed-step graph) is checked for it again here:
that step against its two forwards, within the build's logits_atol.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


def mixed_step_error(backend: Backend, prompt_ids: Sequence[list[int]]) -> Optional[float]:
    """The largest difference, in logits or in the cache left behind, between the backend's one-forward mixed
    step and the same step as two forwards; None when it has none (or the shapes allow no second slot). Rows
    are the first validation prompts, each decoding its last token again; the chunk is the second half of all
    prompts joined (twice over), its first half prefilled already."""
    backend.prepare_mixed_steps()
    bounds = backend.target.shapes
    rows = [list(ids) for ids in prompt_ids[:2] if ids][:max(0, (bounds.max_batch if bounds else 1) - 1)]
    joined = [t for ids in prompt_ids for t in ids] * 2  # twice over: a prefilled half and a chunk, always
    joined = joined[:(bounds.max_sequence if bounds else 64) - 1]
    if not backend.mixes_steps or not rows or len(joined) < 2:
        return None
    half = len(joined) // 2
    ids = np.array([[r[-1]] for r in rows], dtype=np.int64)
    past = np.array([len(r) for r in rows], dtype=np.int64)
    chunk = np.array([joined[half:]], dtype=np.int64)
    caches = []
    for _ in range(2):
        cache = backend.allocate_cache(len(rows) + 1, max(len(joined), *(len(r) + 1 for r in rows)))
        for slot, r in enumerate(rows):
            backend.forward(cache, slot, np.array([r]), np.array([0]), last_only=True)
        backend.forward(cache, len(rows), np.array([joined[:half]]), np.array([0]), last_only=True)
        caches.append(cache)
    mixed_rows, mixed_chunk = backend.forward_mixed(caches[0], ids, past, len(rows), chunk, half)
    two_chunk = backend.forward(caches[1], len(rows), chunk, np.array([half]), last_only=True)
    two_rows = backend.forward(caches[1], 0, ids, past)
    return float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                     for a, b in ((mixed_rows, two_rows), (mixed_chunk, two_chunk), (caches[0].data, caches[1].data))))
