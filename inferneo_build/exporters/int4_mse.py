"""int4 weights by a per-block least-squares search (`int4: {algorithm: mse}`), written as onnxruntime MatMulNBits.

Round-to-nearest takes each block's scale from its range (max|w| / 7 symmetric, (max - min) / 15 asymmetric)
and rounds. That scale is rarely the one with the smallest error: one outlier stretches the grid for the 31 other
weights. Here every block tries a set of candidate scales around the range's, keeps the one whose rounded weights
reconstruct the block with the least squared error, then refits that scale by least squares for the chosen
integers (the idea behind llama.cpp's k-quants). Zero points stay integers (uint8), so onnxruntime's fast
int8-activation kernel (`accuracy_level: 4`) runs the result; float zero points would be exact for more blocks
but fall back to a kernel about ten times slower.

Weights are [N, K] (output rows, input columns); blocks run along K, as MatMulNBits expects (nbits.py writes them).
"""
from __future__ import annotations

import numpy as np

from .nbits import Blocks, pad_to_zero_point, padded_blocks

LEVELS = 15  # 4 bits: integers 0..15
# candidate scales, as multiples of the range's (max - min) / 15; 1.0 is plain asymmetric round-to-nearest
_CANDIDATES = np.linspace(0.84, 1.12, 8)  # includes 1.0


def _round_to(blocks: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integers q in 0..15 and integer zero points z so that scale * (q - z) approximates blocks."""
    zero = np.clip(np.round(-lo / scale), 0, LEVELS)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, LEVELS)
    return q, zero


def quantize_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [N, K/bs, bs], scales float32 [N, K/bs], zero points uint8 [N, K/bs]) for float weights [N, K]; a
    partial last block (K/bs rounded up) is fitted to its real weights, its padding's integers the zero point."""
    blocks, pad = padded_blocks(w, block_size)
    real = np.ones(blocks.shape[1:], np.float32)  # [blocks, bs]: 0 on the last block's padding
    if pad:
        real[-1, -pad:] = 0.0
    lo, hi = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)  # the grid must hold 0 exactly
    span = np.maximum(hi - lo, 1e-12) / LEVELS
    best_err = np.full(lo.shape, np.inf)
    best_scale = span.copy()
    for c in _CANDIDATES:
        scale = span * c
        q, zero = _round_to(blocks, scale, lo)
        err = (np.square(scale[..., None] * (q - zero[..., None]) - blocks) * real).sum(-1)
        better = err < best_err
        best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q, zero = _round_to(blocks, best_scale, lo)
    # least-squares scale for the chosen integers; kept only where it lowers the error
    centred = (q - zero[..., None]) * real
    denom = np.square(centred).sum(-1)
    fitted = np.where(denom > 0, (blocks * centred).sum(-1) / np.maximum(denom, 1e-30), best_scale)
    fitted_err = (np.square(fitted[..., None] * centred - blocks) * real).sum(-1)
    use = (fitted > 0) & (fitted_err < best_err)
    scale = np.where(use, fitted, best_scale)
    zero = zero.astype(np.uint8)
    return pad_to_zero_point(q.astype(np.uint8), pad, zero), scale.astype(np.float32), zero


def mse_blocks(w: np.ndarray, block_size: int) -> Blocks:
    q, scales, zero = quantize_blocks(w, block_size)
    return Blocks(4, q, scales, zero, k=w.shape[1] if w.shape[1] % block_size else None)
