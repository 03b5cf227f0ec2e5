"""The evaluation text that reduced-precision targets are judged on, teacher-forced against the reference.

By default: three shipped documents (`eval_text/`: public-domain prose, Python code, a chat in ChatML), about
3,000 tokens with SmolLM2's tokenizer, so that a perplexity difference of half a percent is a measurement and not
noise (three prompts gave 120 positions). A recipe can name its own files (`validation.evaluation_files`) or give
one inline text (`validation.perplexity_text`).

Each document is split into windows no longer than the target's sequence bound, and each window is one prefill
into a fresh cache. The reference's logits for every window are kept on disk (a memory map): 3,000 positions of a
150k vocabulary are 1.8 GB as float32, which a build should not hold in memory next to the model.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .validate import agreement, prefill_logits, token_nll

SHIPPED_DIR = Path(__file__).parent / "eval_text"
MAX_WINDOW = 1024  # prefill length per window: long enough for context, short enough for any shape bound


def shipped_documents() -> list[tuple[str, str]]:
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(SHIPPED_DIR.glob("*.txt"))]


def documents_for(validation) -> tuple[str, list[tuple[str, str]]]:
    """(a label for the manifest, [(name, text)]): the recipe's own text, its files, or the shipped set."""
    if validation.perplexity_text:
        return "recipe perplexity_text", [("perplexity_text", validation.perplexity_text)]
    if validation.evaluation_files:
        return "recipe evaluation_files", [(str(p), Path(p).read_text(encoding="utf-8"))
                                           for p in validation.evaluation_files]
    return "builtin (prose, code, dialogue)", shipped_documents()


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive windows of at most `size` tokens; a trailing window under 2 tokens predicts nothing: dropped."""
    out = [list(ids[s:s + size]) for s in range(0, len(ids), size)]
    return [w for w in out if len(w) >= 2]


@dataclass
class Scores:
    """Teacher-forced figures of one backend over the evaluation windows."""

    positions: int  # positions compared (top-1, KL)
    agree: int
    kl_sum: float
    nll_sum: float  # summed negative log-likelihood of each window's next tokens
    predicted: int  # tokens predicted (positions minus one per window)
    finite: bool = True

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll_sum / self.predicted))


class EvaluationReference:
    """The reference's logits over the evaluation windows, and the scoring of a target against them."""

    def __init__(self, label: str, windows_: list[list[int]], logits: list[np.ndarray], tmp):
        self.label, self.windows, self.logits, self._tmp = label, windows_, logits, tmp
        self.reference = Scores(positions=sum(map(len, windows_)), agree=sum(map(len, windows_)), kl_sum=0.0,
                                nll_sum=sum(token_nll(l, w) for l, w in zip(logits, windows_)),
                                predicted=sum(len(w) - 1 for w in windows_))

    @classmethod
    def run(cls, reference_backend, tokenizer, validation, max_sequence: int) -> Optional["EvaluationReference"]:
        label, docs = documents_for(validation)
        size = min(max_sequence, MAX_WINDOW)
        wins = [w for _, text in docs for w in windows(tokenizer.encode(text), size)]
        if not wins:
            return None
        tmp = tempfile.TemporaryDirectory(prefix="inferneo-eval-")
        logits = []
        for i, w in enumerate(wins):
            got = prefill_logits(reference_backend, w)
            mm = np.lib.format.open_memmap(Path(tmp.name) / f"{i}.npy", mode="w+", dtype=np.float32, shape=got.shape)
            mm[:] = got
            logits.append(mm)
        return cls(label, wins, logits, tmp)

    @property
    def tokens(self) -> int:
        return self.reference.positions

    def score(self, backend) -> Scores:
        s = Scores(positions=0, agree=0, kl_sum=0.0, nll_sum=0.0, predicted=0)
        for w, ref in zip(self.windows, self.logits):
            got = prefill_logits(backend, w)
            if not np.all(np.isfinite(got)):
                s.finite = False
                continue
            agree, kl = agreement(ref, got)
            s.positions += len(w)
            s.agree, s.kl_sum = s.agree + agree, s.kl_sum + kl
            s.nll_sum, s.predicted = s.nll_sum + token_nll(got, w), s.predicted + len(w) - 1
        return s

    def close(self) -> None:
        self.logits = []
        self._tmp.cleanup()
