"""Our own MatMulNBits writer: float32 MatMuls with a constant weight replaced by onnxruntime's block-quantized
MatMulNBits, with the block quantizers the `int4` options name (`mse`, `affine`; `head_bits: 8` for the output
head). onnxruntime's MatMulNBitsQuantizer covers round-to-nearest and HQQ; these are the layouts it lacks.

MatMulNBits holds, per block of `block_size` weights along the input axis, integers q and a scale s, with an
integer zero point z (default 2^(bits-1)): w = s * (q - z). Its fast CPU kernel (`accuracy_level: 4`) takes only
uint8 zero points; float zero points run a kernel about ten times slower.

`affine` blocks (llama.cpp's Q4_1 layout) are w = s * q + m with a float minimum m per block, which an integer
zero point cannot hold. The kernel computes s * (q - 8) and the rest, (m + 8 s) summed against the input's
block sums, is a float32 MatMul of [K / block_size] by [K / block_size, N]: 1/32 of the weight's MatMul in
work, three more small nodes per quantized MatMul (block sums, offsets, add; about 13% of SmolLM2's int4
decode on 2 cores). A source that is itself Q4_1 (the bundled SmolLM2 GGUF) is reproduced exactly this way,
where any integer-zero-point layout re-rounds every block. With 8 bits, 255 steps hold Q4_1's 15 exactly too.

A K that block_size does not divide (SmolLM2's hidden 576 in blocks of 128) has ceil(K / block_size) blocks per
column, the last one partial, as onnxruntime's MatMulNBits defines it (its own quantizer pads the same way). Each
quantizer sees the partial block's real weights only (its tail padded with a copy of the row's last weight, which
leaves the block's range as it was; `mse` weighs the tail zero), and the tail's integers are the zero point, so
the kernel's part of the padding is exactly 0 whatever it reads against it.

Weights are [N, K] (output rows, input columns) here; the graph's MatMul initializers are [K, N].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class Blocks:
    """A [N, K] weight in blocks of `block_size` along K: w = scales * (q - zero) + offset."""

    bits: int
    q: np.ndarray  # uint8 [N, K/bs, bs] (K/bs rounded up), integers 0..2^bits-1
    scales: np.ndarray  # float32 [N, K/bs]
    zero: Optional[np.ndarray] = None  # uint8 [N, K/bs]; None: the kernel's default 2^(bits-1)
    offset: Optional[np.ndarray] = None  # float32 [N, K/bs], added to every weight of its block
    k: int | None = None  # the weight's own width where the last block is partial (K/bs rounded up above)

    def dequantized(self) -> np.ndarray:
        """The [N, K] weights these blocks hold (a partial last block's padding left out)."""
        z = (1 << (self.bits - 1)) if self.zero is None else self.zero[..., None].astype(np.float32)
        w = self.scales[..., None] * (self.q.astype(np.float32) - z)
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(w.shape[0], -1)[:, :self.k]


def padded_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """[N, K] weights as float32 [N, ceil(K/bs), bs] blocks, and how many weights pad the last block (0 where bs
    divides K). The padding repeats each row's last weight, so every block's min, max and max|w| are its real
    weights'; `pad_to_zero_point` then sets the padding's integers to the zero point."""
    n, k = w.shape
    pad = -k % block_size
    w = w.astype(np.float32)
    if pad:
        w = np.concatenate([w, np.repeat(w[:, -1:], pad, axis=1)], axis=1)
    return w.reshape(n, -1, block_size), pad


def pad_to_zero_point(q: np.ndarray, pad: int, zero) -> np.ndarray:
    """q [N, blocks, bs] with the last block's `pad` trailing integers set to the zero point (an int, or [N, blocks]
    zero points): the kernel dequantizes them to exactly 0."""
    if pad:
        q[:, -1, -pad:] = zero if np.isscalar(zero) else np.asarray(zero)[:, -1:]
    return q


def affine_blocks(w: np.ndarray, block_size: int, bits: int = 4) -> Blocks:
    """Round-to-nearest on each block's own range, [min, max] in 2^bits - 1 steps (a multiple of the block's own
    step count where it is already on a coarser grid), the minimum kept as a float."""
    blocks, pad = padded_blocks(w, block_size)
    top = (1 << bits) - 1
    lo, hi = blocks.min(-1), blocks.max(-1)
    # a block already on a coarser grid (a GGUF's Q4_0 or Q4_K block that uses 14 of its 16 levels, Q5_0 at 8 bits)
    # keeps it: its span in steps times as many as fit in `top`, so the grid's levels are among ours
    steps = _grid_steps(blocks, lo, hi, top)
    steps = np.where(steps > 0, steps * (top // np.maximum(steps, 1)), top).astype(np.float32)
    scale = np.where(hi > lo, (hi - lo) / steps, 1.0).astype(np.float32)
    q = np.clip(np.round((blocks - lo[..., None]) / scale[..., None]), 0, top).astype(np.uint8)
    mid = 1 << (bits - 1)
    # w = s * (q - mid) + (lo + mid s); the padding's q = mid: the kernel's s * (q - mid) is 0 there, and the
    # offset is added against the input's real block sums only
    return Blocks(bits, pad_to_zero_point(q, pad, mid), scale, None, (lo + mid * scale).astype(np.float32),
                  w.shape[1] if pad else None)


def _grid_steps(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, top: int) -> np.ndarray:
    """Per block, the n <= `top` for which every weight is lo + k (hi - lo) / n with k an integer, else 0. Tried
    first with n = `top` (a Q4_1 source at 4 bits: every block), then for the rest with the smallest gap between
    the block's distinct values divided by 1..8 (levels the block does not use) as the step."""
    span = hi - lo
    found = np.where(_on_grid(blocks, lo, span, np.full(span.shape, float(top))), top, 0)
    rest = np.nonzero(found == 0)
    # a tensor is one source type: where its first 256 other blocks are on no grid (float weights), none is
    probe = tuple(i[:256] for i in rest)
    if rest[0].size and _searched_steps(blocks[probe], lo[probe], span[probe], top).any():
        found[rest] = _searched_steps(blocks[rest], lo[rest], span[rest], top)
    return found


def _searched_steps(blocks: np.ndarray, lo: np.ndarray, span: np.ndarray, top: int) -> np.ndarray:
    """`_grid_steps`' search for [blocks, bs] weights: the step is the smallest gap between distinct values / j."""
    gaps = np.diff(np.sort(blocks, -1), axis=-1)
    gap = np.where(gaps > span[:, None] * 1e-4, gaps, np.inf).min(-1)  # smaller gaps: equal values, float noise
    found = np.zeros(span.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(1, 9):
            n = np.round(j * span / gap)
            idx = np.flatnonzero((found == 0) & np.isfinite(n) & (n >= 1) & (n <= top))
            fits = _on_grid(blocks[idx], lo[idx], span[idx], n[idx])
            found[idx[fits]] = n[idx][fits]
    return found


def _on_grid(blocks: np.ndarray, lo: np.ndarray, span: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Whether each block's weights are lo + k span / n, k an integer (to a thousandth of a step)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (blocks - lo[..., None]) / (span / n).astype(np.float32)[..., None]
        return (span > 0) & (np.abs(pos - np.round(pos)).max(-1) < 1e-3)


def source_grid(w: np.ndarray, samples: int = 4096) -> str:
    """What a [N, K] weight's values say of its source: "4-bit" (every block of 32 on a grid of at most 16 levels:
    a GGUF's Q4_0, Q4_1, Q4_K), "finer" (not that, but every 16-weight sub-block on a grid of at most 256 levels:
    Q5_x, Q6_K's 16-weight sub-blocks, Q8_0) or "float" (no grid: float weights have finer steps near zero than
    at their range's ends). Judged on up to `samples` evenly spread blocks of each size."""
    def spread(blocks: np.ndarray) -> np.ndarray:
        flat = blocks.reshape(-1, blocks.shape[-1])
        return flat[np.linspace(0, len(flat) - 1, min(samples, len(flat))).astype(int)]

    def on_grid(blocks: np.ndarray, top: int) -> np.ndarray:
        lo, hi = blocks.min(-1), blocks.max(-1)
        return (hi == lo) | (_grid_steps(blocks, lo, hi, top) > 0)  # a constant block is on every grid

    if on_grid(spread(padded_blocks(w, 32)[0]), 15).all():
        return "4-bit"
    return "finer" if on_grid(spread(padded_blocks(w, 16)[0]), 255).all() else "float"


def symmetric_blocks(w: np.ndarray, block_size: int, bits: int = 8) -> Blocks:
    """Round-to-nearest with scale max|w| / (2^(bits-1) - 1) and the default zero point: llama.cpp's Q8_0 layout
    for bits=8, so a Q8_0 source (a GGUF's embedding, tied to the head) is reproduced exactly."""
    blocks, pad = padded_blocks(w, block_size)
    limit = (1 << (bits - 1)) - 1
    amax = np.abs(blocks).max(-1)
    scale = np.where(amax > 0, amax / limit, 1.0).astype(np.float32)
    q = np.clip(np.round(blocks / scale[..., None]), -limit, limit) + (1 << (bits - 1))
    return Blocks(bits, pad_to_zero_point(q.astype(np.uint8), pad, 1 << (bits - 1)), scale,
                  k=w.shape[1] if pad else None)


def expert_blocks(w: np.ndarray, bits: int, block_size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked expert weights [E, N, K] as onnxruntime's QMoE holds them: symmetric round-to-nearest, (q - 2^(bits-1))
    times a scale per block of `block_size` along K (scales [E, N, K / bs]) or per row where block_size is None
    (scales [E, N]); bytes [E, N, K * bits / 8], for 4 bits the even element in the low nibble."""
    experts, n, k = w.shape
    parts = [symmetric_blocks(w[e], block_size or k, bits) for e in range(experts)]
    packed = np.stack([_pack(b.q, bits).reshape(n, -1) for b in parts])
    scales = np.stack([b.scales for b in parts])
    return packed, (scales if block_size else scales[..., 0])


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B: [N, K/bs, bs * bits / 8] bytes; for 4 bits the even element is the low nibble."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """[N, K/bs] zero points as MatMulNBits stores them: one byte each for 8 bits, two per byte (by row) for 4."""
    return (zero if bits == 8 else _pack(zero, 4)).reshape(-1)


# chooses how to quantize one MatMul: (its name, its [N, K] weight) -> Blocks, or None to keep it float32
Plan = Callable[[str, np.ndarray], Optional[Blocks]]


def quantize_matmuls(model: onnx.ModelProto, plan: Plan, block_size: int, accuracy_level: int) -> onnx.ModelProto:
    """Replace each MatMul whose weight is a float32 initializer [K, N] and that `plan` quantizes with a
    MatMulNBits node (ceil(K / block_size) blocks per column), plus the offset correction of affine blocks; the
    graph's inputs and outputs are unchanged."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes, dropped, added = [], set(), []
    for node in graph.node:
        weight = float_weight(node, inits)
        blocks = None if weight is None else plan(node.name, numpy_helper.to_array(weight).T)
        if blocks is None:
            nodes.append(node)
            continue
        k, n = weight.dims
        assert blocks.q.shape == (n, -(-k // block_size), block_size), (node.name, blocks.q.shape, k, block_size)
        base, x, y = node.input[1], node.input[0], node.output[0]
        inputs = [x, f"{base}_Q{blocks.bits}", f"{base}_scales"]
        added += [numpy_helper.from_array(_pack(blocks.q, blocks.bits), inputs[1]),
                  numpy_helper.from_array(blocks.scales.reshape(-1), inputs[2])]
        if blocks.zero is not None:
            inputs.append(f"{base}_zero_points")
            added.append(numpy_helper.from_array(_zero_points(blocks.zero, blocks.bits), inputs[3]))
        product = y if blocks.offset is None else f"{y}/nbits"
        nodes.append(helper.make_node("MatMulNBits", inputs, [product], name=nbits_node_name(node.name, blocks.bits),
                                      domain="com.microsoft", K=k, N=n, bits=blocks.bits, block_size=block_size,
                                      accuracy_level=accuracy_level))
        if blocks.offset is not None:
            nodes += _offset_nodes(node.name, base, x, product, y, blocks.offset, k, block_size, added)
        users[base] -= 1
        if users[base] == 0:
            dropped.add(base)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in dropped] + added
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def float_weight(node: onnx.NodeProto, inits: dict) -> Optional[onnx.TensorProto]:
    """The float32 [K, N] initializer that MatMul `node` multiplies by (what a plan may quantize), else None."""
    weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
    if weight is not None and weight.data_type == onnx.TensorProto.FLOAT and len(weight.dims) == 2:
        return weight
    return None


def nbits_node_name(matmul: str, bits: int) -> str:
    """The MatMulNBits node that replaces MatMul `matmul`."""
    return f"{matmul}_Q{bits}"


def correction_matmuls(matmul: str) -> tuple[str, str]:
    """The names of the two float32 MatMuls (block sums, offsets) of an affine MatMulNBits replacing `matmul`."""
    return f"{matmul}_block_sums", f"{matmul}_offsets"


def _offset_nodes(name: str, base: str, x: str, product: str, y: str, offset: np.ndarray, k: int,
                  block_size: int, added: list) -> list[onnx.NodeProto]:
    """y = product + (x's block sums) @ offset^T. The block sums are a MatMul with a 0/1 [K, K/bs] matrix, which
    works for any input rank, where a Reshape + ReduceSum would need the rank."""
    n_blocks = -(-k // block_size)  # a partial last block sums the inputs it has
    summer = f"nbits_block_sums_{k}x{block_size}"  # one per shape, shared by every MatMul of that K
    if not any(t.name == summer for t in added):
        indicator = np.zeros((k, n_blocks), np.float32)
        indicator[np.arange(k), np.arange(k) // block_size] = 1.0
        added.append(numpy_helper.from_array(indicator, summer))
    added.append(numpy_helper.from_array(np.ascontiguousarray(offset.T), f"{base}_offsets"))
    sums, correction = f"{y}/block_sums", f"{y}/offset"
    block_sums, offsets = correction_matmuls(name)
    return [helper.make_node("MatMul", [x, summer], [sums], name=block_sums),
            helper.make_node("MatMul", [sums, f"{base}_offsets"], [correction], name=offsets),
            helper.make_node("Add", [product, correction], [y], name=f"{name}_add_offsets")]
