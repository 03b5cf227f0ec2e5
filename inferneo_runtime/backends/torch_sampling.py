"""The sampler's draw on a GPU, where a torch backend's logits are, so that only the tokens cross to the host
(on the CPU the backends use numpy's, which is faster there).

`draw_tokens` is `sampling.draw_tokens` in torch: the same steps in the same order and in float64 (temperature,
top-k keeping ties at the k-th value, softmax, top-p over probabilities sorted stably, min-p, the inverse-CDF draw
at the request's uniform), so a seed gives the same tokens as the numpy sampler on the host. Float64 sums in
another order can differ in the last bits, which moves a draw only when its uniform falls within about 1e-16 of
a boundary.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..sampling import SamplingParams


def draw_tokens(logits: "torch.Tensor", params: Sequence[SamplingParams], uniforms: np.ndarray) -> np.ndarray:
    """Each row's token from logits [n, vocab] on the device: greedy rows their argmax (the first of equal
    maxima), the others drawn at `uniforms[row]`. One transfer of [n] tokens back."""
    tokens = logits.float().argmax(-1)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        tokens[rows] = _draw([params[r] for r in sampled], logits[rows], [float(uniforms[r]) for r in sampled])
    return tokens.cpu().numpy()


def _draw(params: list[SamplingParams], logits: "torch.Tensor", uniforms: list[float]) -> "torch.Tensor":
    vocab = logits.shape[-1]
    # one host-to-device copy of every row's settings: temperature, top-k, top-p, min-p, uniform
    settings = torch.tensor([[p.temperature, p.top_k if 0 < p.top_k < vocab else 0, p.top_p, p.min_p, u]
                             for p, u in zip(params, uniforms)], dtype=torch.float64, device=logits.device)
    temperature, top_k, top_p, min_p, u = settings.T[:, :, None]
    x = logits.float().double() / temperature
    if (top_k > 0).any():  # keep every value >= the row's k-th largest (ties with it included)
        largest = x.topk(int(top_k.max()), dim=-1).values
        kth = largest.gather(-1, (top_k.long() - 1).clamp(min=0))
        x = torch.where((top_k > 0) & (x < kth), float("-inf"), x)
    probs = torch.exp(x - x.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    if (top_p < 1).any():  # the smallest prefix of the sorted probabilities whose mass reaches top_p
        ordered, order = probs.sort(dim=-1, descending=True, stable=True)
        ahead = torch.nn.functional.pad(ordered.cumsum(-1)[:, :-1], (1, 0))  # the mass ahead of each token
        keep = (ahead < top_p) | (top_p >= 1)
        keep[:, 0] = True
        probs = torch.where(torch.zeros_like(keep).scatter(-1, order, keep), probs, 0.0)
    probs = torch.where(probs >= min_p * probs.max(-1, keepdim=True).values, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    token = torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True), right=True)
    return token[:, 0].clamp(max=vocab - 1)
