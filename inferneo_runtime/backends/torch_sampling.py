"""The sampler's draw on a GPU, where a torch backend's logits are, so that only the tokens cross to the host
(on the CPU the backends use numpy's, which is faster there).

`DeviceDraw` is `sampling.draw_tokens` in torch: the same steps in the same order and in float64 (temperature,
top-k keeping ties at the k-th value, softmax, top-p over probabilities sorted stably, min-p, the inverse-CDF draw
at the request's uniform), so a seed gives the same tokens as the numpy sampler on the host. Float64 sums in
another order can differ in the last bits, which moves a draw only when its uniform falls within about 1e-16 of
a boundary. Nothing waits for the device before the tokens are copied back: the rows' settings are sent before
the step runs, and every branch is decided from them on the host.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..sampling import SamplingParams


class DeviceDraw:
    """One step's draw for rows with `params` at `uniforms`; made before the step, so that the settings' copy
    (from pageable host memory, which waits for the device's queue) is not queued behind the step's work."""

    def __init__(self, params: Sequence[SamplingParams], uniforms: np.ndarray, device: "torch.device"):
        self.sampled = [row for row, p in enumerate(params) if not p.greedy]
        if not self.sampled:
            return
        rows = [params[r] for r in self.sampled]
        self.top_k = max((p.top_k for p in rows), default=0)  # the most values any row keeps (0, -1: no top-k)
        self.top_p = any(p.top_p < 1 for p in rows)
        self.rows = torch.tensor(self.sampled, device=device)
        # one copy of every sampled row's settings: temperature, top-k, top-p, min-p, uniform
        self.settings = torch.tensor([[p.temperature, max(p.top_k, 0), p.top_p, p.min_p, float(uniforms[r])]
                                      for r, p in zip(self.sampled, rows)],
                                     dtype=torch.float64, device=device)

    def tokens(self, logits: "torch.Tensor") -> np.ndarray:
        """Each row's token from its logits [n, vocab] on the device: greedy rows their argmax (the first of equal
        maxima), the others drawn. One transfer of [n] tokens back."""
        tokens = logits.float().argmax(-1)
        if self.sampled:
            tokens[self.rows] = self._draw(logits[self.rows])
        return tokens.cpu().numpy()

    def _draw(self, logits: "torch.Tensor") -> "torch.Tensor":
        vocab = logits.shape[-1]
        temperature, top_k, top_p, min_p, u = self.settings.T[:, :, None]
        x = logits.float().double() / temperature
        if 0 < self.top_k:  # keep every value >= the row's k-th largest (ties with it included); k >= vocab: all
            top_k = torch.where(top_k < vocab, top_k, 0.0)
            kth = x.topk(min(self.top_k, vocab), dim=-1).values.gather(-1, (top_k.long() - 1).clamp(min=0))
            x = torch.where((top_k > 0) & (x < kth), float("-inf"), x)
        probs = torch.exp(x - x.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        if self.top_p:  # the smallest prefix of the sorted probabilities whose mass reaches top_p
            ordered, order = probs.sort(dim=-1, descending=True, stable=True)
            ahead = torch.nn.functional.pad(ordered.cumsum(-1)[:, :-1], (1, 0))  # the mass ahead of each token
            keep = (ahead < top_p) | (top_p >= 1)
            keep[:, 0] = True
            probs = torch.where(torch.zeros_like(keep).scatter(-1, order, keep), probs, 0.0)
        probs = torch.where(probs >= min_p * probs.max(-1, keepdim=True).values, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
        token = torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True), right=True)
        return token[:, 0].clamp(max=vocab - 1)


def draw_tokens(logits: "torch.Tensor", params: Sequence[SamplingParams], uniforms: np.ndarray) -> np.ndarray:
    """`DeviceDraw` made and run at once (where nothing runs before the draw)."""
    return DeviceDraw(params, uniforms, logits.device).tokens(logits)
