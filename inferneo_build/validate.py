"""Validation, comparator-style: run the reference and a target through the runtime's generation loop on the
same prompt ids, then compare logits (max-abs) and greedy tokens. Knows nothing about any backend's internals."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from inferneo_runtime.backends.base import Backend
from inferneo_runtime.generation import GenerationParams, SequenceOutput, generate_ids
from inferneo_runtime.manifest import ValidationSummary


@dataclass
class PromptComparison:
    prompt: str
    prompt_tokens: int
    reference_tokens: list[int]
    target_tokens: list[int]
    max_abs_logits_error: float
    first_divergence: Optional[int]
    nonfinite: bool
    seconds: float


@dataclass
class TargetReport:
    target: str
    passed: bool
    reason: Optional[str]
    max_abs_logits_error: float
    logits_atol: float
    prompts: list[PromptComparison] = field(default_factory=list)

    def summary(self, new_tokens: int) -> ValidationSummary:
        divergences = [p.first_divergence for p in self.prompts if p.first_divergence is not None]
        return ValidationSummary(
            status="passed" if self.passed else "failed", reason=self.reason,
            max_abs_logits_error=self.max_abs_logits_error, logits_atol=self.logits_atol,
            token_match=not divergences, first_divergence=min(divergences) if divergences else None,
            prompts=len(self.prompts), new_tokens=new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


def run_reference(backend: Backend, prompt_ids: Sequence[list[int]], max_new_tokens: int,
                  eos_ids: Sequence[int]) -> list[SequenceOutput]:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    # one prompt per call: the reference runs unbatched
    return [generate_ids(backend, [ids], params, eos_ids, keep_logits=True)[0] for ids in prompt_ids]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _max_abs_error(ref: SequenceOutput, out: SequenceOutput, agree: int) -> tuple[float, bool]:
    """Max |ref - target| over the prompt logits and the decode steps whose inputs still agree."""
    pairs = [(ref.prompt_logits, out.prompt_logits)]
    # step k's logits were computed from the same inputs while tokens[:k] agree
    pairs += list(zip(ref.step_logits[: agree + 1], out.step_logits[: agree + 1]))
    err, nonfinite = 0.0, False
    for r, t in pairs:
        if not np.all(np.isfinite(t)):
            nonfinite = True
            continue
        err = max(err, float(np.max(np.abs(r.astype(np.float64) - t.astype(np.float64)))))
    return err, nonfinite


def compare_target(name: str, backend: Backend, prompts: Sequence[str], prompt_ids: Sequence[list[int]],
                   reference: Sequence[SequenceOutput], max_new_tokens: int, logits_atol: float,
                   eos_ids: Sequence[int]) -> TargetReport:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    comparisons = []
    for text, ids, ref in zip(prompts, prompt_ids, reference):
        t0 = time.perf_counter()
        out = generate_ids(backend, [ids], params, eos_ids, keep_logits=True)[0]
        seconds = time.perf_counter() - t0
        div = first_divergence(ref.token_ids, out.token_ids)
        agree = len(ref.token_ids) if div is None else div
        err, nonfinite = _max_abs_error(ref, out, agree)
        comparisons.append(PromptComparison(text, len(ids), ref.token_ids, out.token_ids, err, div, nonfinite, seconds))

    worst = max(c.max_abs_logits_error for c in comparisons)
    problems = []
    if any(c.nonfinite for c in comparisons):
        problems.append("non-finite logits (NaN/Inf)")
    if worst > logits_atol:
        problems.append(f"max-abs logits error {worst:.3g} exceeds logits_atol {logits_atol:.3g}")
    diverged = [(i, c.first_divergence) for i, c in enumerate(comparisons) if c.first_divergence is not None]
    if diverged:
        i, k = diverged[0]
        problems.append(f"greedy tokens diverge from the reference on {len(diverged)} of {len(comparisons)} prompts "
                        f"(prompt {i} at token {k})")
    return TargetReport(target=name, passed=not problems, reason="; ".join(problems) or None,
                        max_abs_logits_error=worst, logits_atol=logits_atol, prompts=comparisons)
