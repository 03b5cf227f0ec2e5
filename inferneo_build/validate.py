"""Validation, comparator-style: run the reference and a target through the runtime on the same inputs and
compare. Knows nothing about any backend's internals.

Two criteria (recorded in the manifest as `criterion`):
- exact (float32 decoders): greedy tokens equal the reference's and logits stay within `logits_atol`.
- tolerance (reduced precisions): teacher-forced, the reference's greedy sequence (prompt + its tokens) goes
  through the target in one prefill, and each position's logits are compared with the reference's at the
  same position: top-1 agreement and mean KL(reference || target). Perplexity on a small text is compared
  too. Each metric has a stated threshold; missing any fails the target (fail closed). Greedy tokens are still
  generated and recorded, but a divergence alone does not fail a reduced precision.
Encoders are judged by the cosine similarity of their outputs to the reference's (`compare_encoder`).
A target that decodes and prefills in one forward (`Backend.mixes_steps`: onnx's mixed-step graph) must also
give that step the logits and cache of its two forwards, within `logits_atol`, in every precision.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from inferneo_runtime.backends.base import Backend
from inferneo_runtime.generation import GenerationParams, SequenceOutput, generate_ids
from inferneo_runtime.goldens import mixed_step_error, prefill_logits
from inferneo_runtime.manifest import Tolerances, ValidationSummary

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
    # teacher-forced over prompt + reference tokens
    positions: int = 0
    top1_agreement: Optional[float] = None
    mean_kl: Optional[float] = None
    # max |reference - target| of the prompt's (prefill) logits, and of each decode step's logits while the
    # greedy inputs still agree (steps after a divergence ran on other inputs: not compared); None: non-finite
    prompt_logits_error: Optional[float] = None
    step_logits_errors: list[Optional[float]] = field(default_factory=list)


@dataclass
class TargetReport:
    target: str
    passed: bool
    reason: Optional[str]
    max_abs_logits_error: float
    logits_atol: float
    prompts: list[PromptComparison] = field(default_factory=list)
    criterion: str = "exact"
    precision: str = "fp32"
    tolerance: Optional[dict] = None
    positions: int = 0
    top1_agreement: Optional[float] = None
    mean_kl: Optional[float] = None
    perplexity: Optional[float] = None
    reference_perplexity: Optional[float] = None
    perplexity_delta: Optional[float] = None
    evaluation_tokens: Optional[int] = None  # of `positions`, those from the evaluation text
    kernel_path: Optional[str] = None
    mixed_step_error: Optional[float] = None  # max |one-forward mixed step - its two forwards| (logits, cache)

    def summary(self, new_tokens: int) -> ValidationSummary:
        divergences = [p.first_divergence for p in self.prompts if p.first_divergence is not None]
        return ValidationSummary(
            status="passed" if self.passed else "failed", reason=self.reason,
            max_abs_logits_error=self.max_abs_logits_error,
            logits_atol=self.logits_atol if self.criterion == "exact" else None,
            token_match=not divergences, first_divergence=min(divergences) if divergences else None,
            prompts=len(self.prompts), new_tokens=new_tokens, criterion=self.criterion,
            tolerance=Tolerances(**self.tolerance) if self.tolerance else None, positions=self.positions or None,
            top1_agreement=self.top1_agreement, mean_kl=self.mean_kl, perplexity=self.perplexity,
            reference_perplexity=self.reference_perplexity, perplexity_delta=self.perplexity_delta,
            evaluation_tokens=self.evaluation_tokens, kernel_path=self.kernel_path,
            mixed_step_max_abs_error=self.mixed_step_error)

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


# -- metrics (pure functions over logits) -----------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(reference: np.ndarray, target: np.ndarray, chunk: int = 64) -> tuple[int, float]:
    """(positions whose argmax agrees, sum over positions of KL(reference || target)) for [positions, vocab]."""
    agree, kl = 0, 0.0
    for s in range(0, len(reference), chunk):
        r, t = reference[s:s + chunk], target[s:s + chunk]
        agree += int(np.sum(r.argmax(-1) == t.argmax(-1)))
        lr, lt = _log_softmax(r), _log_softmax(t)
        kl += float(np.sum(np.exp(lr) * (lr - lt)))
    return agree, kl


def token_nll(logits: np.ndarray, ids: Sequence[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given the logits at positions [0, len-1)."""
    ids = np.asarray(ids)
    lp = _log_softmax(logits[: len(ids) - 1])
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].sum())


def perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:]) given the logits at positions [0, len-1)."""
    return float(np.exp(token_nll(logits, ids) / (len(ids) - 1)))


def reference_sequence_logits(ref: SequenceOutput) -> tuple[list[int], np.ndarray]:
    """The reference's greedy sequence as one teacher-forced input, and its logits at each input position.

    Prompt position i predicts token i+1; the last prompt position predicts the first generated token, whose
    logits are step 0's; the input stops before the last generated token, whose successor nobody asked for."""
    ids = list(ref.prompt_ids) + list(ref.token_ids[:-1])
    logits = np.concatenate([ref.prompt_logits] + [s[None] for s in ref.step_logits[1:]], axis=0)
    return ids, logits


def _logits_errors(ref: SequenceOutput, out: SequenceOutput, agree: int) -> list[Optional[float]]:
    """Max |ref - target| of the prompt logits, then of each decode step whose inputs still agree (None where
    the target's logits are not finite)."""
    pairs = [(ref.prompt_logits, out.prompt_logits)]
    # step k's logits were computed from the same inputs while tokens[:k] agree
    pairs += list(zip(ref.step_logits[: agree + 1], out.step_logits[: agree + 1]))
    return [float(np.max(np.abs(r.astype(np.float64) - t.astype(np.float64)))) if np.all(np.isfinite(t)) else None
            for r, t in pairs]


def _max_abs_error(ref: SequenceOutput, out: SequenceOutput, agree: int) -> tuple[float, bool]:
    """Max |ref - target| over the prompt logits and the decode steps whose inputs still agree."""
    errors = _logits_errors(ref, out, agree)
    finite = [e for e in errors if e is not None]
    return max(finite, default=0.0), len(finite) < len(errors)


def compare_target(name: str, backend: Backend, prompts: Sequence[str], prompt_ids: Sequence[list[int]],
                   reference: Sequence[SequenceOutput], max_new_tokens: int, logits_atol: float,
                   eos_ids: Sequence[int], *, tolerance: Optional[Tolerances] = None, precision: str = "fp32",
                   evaluation=None, kernel_path: Optional[str] = None) -> TargetReport:
    """Compare one target with the reference. `tolerance` None: the exact criterion; else the tolerance one.
    Teacher-forced metrics are measured and recorded either way: over the prompts' reference sequences, plus the
    evaluation text's windows (and its perplexity) when `evaluation` (an evaluation.EvaluationReference) is given.
    `kernel_path` names the host's quantized-kernel path the figures were measured on."""
    params = GenerationParams(max_new_tokens=max_new_tokens)
    comparisons = []
    agree_total, kl_total, positions, tf_nonfinite, tf_max_err = 0, 0.0, 0, False, 0.0
    for prompt, ids, ref in zip(prompts, prompt_ids, reference):
        t0 = time.perf_counter()
        out = generate_ids(backend, [ids], params, eos_ids, keep_logits=True)[0]
        seconds = time.perf_counter() - t0
        div = first_divergence(ref.token_ids, out.token_ids)
        agree = len(ref.token_ids) if div is None else div
        errors = _logits_errors(ref, out, agree)
        finite = [e for e in errors if e is not None]
        err, nonfinite = max(finite, default=0.0), len(finite) < len(errors)

        forced_ids, ref_logits = reference_sequence_logits(ref)
        got = prefill_logits(backend, forced_ids)
        n = len(forced_ids)
        if np.all(np.isfinite(got)):
            hits, kl = agreement(ref_logits, got)
            tf_max_err = max(tf_max_err, float(np.max(np.abs(ref_logits.astype(np.float64) - got))))
        else:
            tf_nonfinite, hits, kl = True, 0, float("inf")
        agree_total, kl_total, positions = agree_total + hits, kl_total + kl, positions + n
        comparisons.append(PromptComparison(prompt, len(ids), ref.token_ids, out.token_ids, err, div, nonfinite,
                                            seconds, positions=n, top1_agreement=hits / n, mean_kl=kl / n,
                                            prompt_logits_error=errors[0], step_logits_errors=errors[1:]))

    ppl = ref_ppl = delta = None
    evaluation_tokens = None
    if evaluation is not None:
        scores = evaluation.score(backend)
        tf_nonfinite = tf_nonfinite or not scores.finite
        agree_total, kl_total, positions = agree_total + scores.agree, kl_total + scores.kl_sum, positions + scores.positions
        evaluation_tokens = scores.positions
        if scores.predicted:
            ppl, ref_ppl = scores.perplexity, evaluation.reference.perplexity
            delta = (ppl - ref_ppl) / ref_ppl
    top1 = agree_total / positions
    mean_kl = kl_total / positions
    mixed = mixed_step_error(backend, prompt_ids)

    problems = []
    if any(c.nonfinite for c in comparisons) or tf_nonfinite:
        problems.append("non-finite logits (NaN/Inf)")
    if mixed is not None and not mixed <= logits_atol:
        problems.append(f"the mixed decode + prefill step differs from its two forwards by {mixed:.3g} "
                        f"(logits_atol {logits_atol:.3g})")
    if tolerance is None:
        worst = max(c.max_abs_logits_error for c in comparisons)
        if worst > logits_atol:
            problems.append(f"max-abs logits error {worst:.3g} exceeds logits_atol {logits_atol:.3g}")
        diverged = [(i, c.first_divergence) for i, c in enumerate(comparisons) if c.first_divergence is not None]
        if diverged:
            i, k = diverged[0]
            problems.append(f"greedy tokens diverge from the reference on {len(diverged)} of {len(comparisons)} "
                            f"prompts (prompt {i} at token {k})")
    else:
        worst = tf_max_err  # informational: reduced precisions are not held to logits_atol
        if tolerance.top1_agreement is not None and top1 < tolerance.top1_agreement:
            problems.append(f"top-1 agreement {top1:.4f} is below {tolerance.top1_agreement:g} "
                            f"({positions - agree_total} of {positions} teacher-forced positions differ)")
        if tolerance.mean_kl is not None and not mean_kl <= tolerance.mean_kl:
            problems.append(f"mean KL divergence {mean_kl:.4g} exceeds {tolerance.mean_kl:g}")
        if tolerance.perplexity_delta is not None and delta is not None and not delta <= tolerance.perplexity_delta:
            problems.append(f"perplexity {ppl:.3f} vs reference {ref_ppl:.3f} (+{delta:.2%}) exceeds "
                            f"+{tolerance.perplexity_delta:.2%}")
    return TargetReport(
        target=name, passed=not problems, reason="; ".join(problems) or None, max_abs_logits_error=worst,
        logits_atol=logits_atol, prompts=comparisons, criterion="exact" if tolerance is None else "tolerance",
        precision=precision, tolerance=tolerance.model_dump(exclude_none=True) if tolerance else None,
        positions=positions, top1_agreement=top1, mean_kl=mean_kl, perplexity=ppl, reference_perplexity=ref_ppl,
        perplexity_delta=delta, evaluation_tokens=evaluation_tokens, kernel_path=kernel_path,
        mixed_step_error=mixed)


# -- encoders ----------------------------------------------------------------------------------------------
@dataclass
class EncoderReport:
    target: str
    passed: bool
    reason: Optional[str]
    min_cosine: float
    max_abs_error: float
    cosine: list[float]
    precision: str = "fp32"
    tolerance: Optional[dict] = None
    labels_match: Optional[bool] = None  # text-classification: argmax equals the reference's for every text
    seconds: float = 0.0
    target_kind: str = "encoder"

    def summary(self) -> ValidationSummary:
        return ValidationSummary(
            status="passed" if self.passed else "failed", reason=self.reason, max_abs_logits_error=self.max_abs_error,
            prompts=len(self.cosine), criterion="tolerance", tolerance=Tolerances(**(self.tolerance or {})),
            min_cosine=self.min_cosine, token_match=self.labels_match)

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(denom, 1e-30)


def compare_encoder(name: str, run: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str],
                    reference: np.ndarray, min_cosine: float, *, precision: str = "fp32",
                    classification: bool = False) -> EncoderReport:
    """Run `texts` through a target (`run(texts) -> [n, dim]`) and compare each row with the reference's."""
    t0 = time.perf_counter()
    got = np.asarray(run(texts), dtype=np.float32)
    seconds = time.perf_counter() - t0
    problems = []
    if got.shape != reference.shape:
        problems.append(f"output shape {got.shape} differs from the reference's {reference.shape}")
        cos, err = np.full(len(texts), -1.0), float("inf")
    elif not np.all(np.isfinite(got)):
        problems.append("non-finite outputs (NaN/Inf)")
        cos, err = np.full(len(texts), -1.0), float("inf")
    else:
        cos = cosine_similarity(got, reference)
        err = float(np.max(np.abs(got.astype(np.float64) - reference)))
    worst = float(np.min(cos))
    if not problems and worst < min_cosine:
        i = int(np.argmin(cos))
        problems.append(f"cosine similarity {worst:.10g} (text {i}) is below {min_cosine:g}")
    labels = None
    if classification and not problems:
        labels = bool(np.array_equal(got.argmax(-1), reference.argmax(-1)))
        if not labels:
            problems.append("predicted labels differ from the reference's")
    return EncoderReport(target=name, passed=not problems, reason="; ".join(problems) or None, min_cosine=worst,
                         max_abs_error=err, cosine=[float(c) for c in cos], precision=precision,
                         tolerance={"cosine": min_cosine}, labels_match=labels, seconds=seconds)
