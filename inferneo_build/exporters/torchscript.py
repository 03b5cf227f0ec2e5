"""TorchScript target: a compact project-owned decoder, traced once and saved as one `model.pt`.

The traced module has the runtime's stacked-cache signature (see `inferneo_runtime.backends.base`):

    logits, kv_cache = model(input_ids[n, S], position_ids[n, S], attention_mask[n, T],
                             kv_cache[layers, 2, n, kv_heads, capacity, head_dim], logit_positions[K])

`logit_positions` (indices into 0..S-1) picks the positions whose logits are computed, [S-1] for a
prefill that only samples the next token, 0..S-1 for validation; logits are [n, K, vocab].

Like gpt-fast's `KVCache.update`, each layer writes its new keys/values into the cache in place (a
`scatter_` along the position axis, so rows may sit at different positions) and attends over the first
T positions, T = attention_mask.shape[1]. The cache is owned by the runtime, not by the module: the
tensor passed in may be a view of a bigger cache and the writes land in it. Every size is read from the
inputs, so after tracing batch, step length, total length and capacity all stay dynamic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inferneo_runtime.backends.torchscript import quiet_jit
from inferneo_runtime.manifest import IOSignature, TensorSpec

from ..architectures import DecoderSpec
from . import ExportResult

FILE_NAME = "model.pt"
# Example inputs for tracing: nothing is 1 and S != T != capacity, so no size is specialized away.
_TRACE_BATCH, _TRACE_PAST, _TRACE_STEPS, _TRACE_CAPACITY = 2, (3, 1), 3, 9
_TRACE_LOGIT_POSITIONS = (0, 2)


def _param(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), requires_grad=False)


# Output columns of every projection are split into this many blocks, multiplied as one batched matmul.
GEMV_SPLIT = 2


class _Linear(nn.Module):
    """x @ W (+ b), the [in, out] weight stored as GEMV_SPLIT column blocks [split, in, out / split].

    Decode multiplies one row by each weight, so it is memory-bound, and torch's CPU matmul runs a single-row
    product on one thread (~15-20 GB/s here, whatever the thread count). A batched matmul over column blocks
    spreads the blocks over the threads: measured on 2 cores, 1.6x on the [576, 3072] MLP projection and 1.7x on
    the vocabulary-sized head. The [in, out] layout itself beats nn.Linear's [out, in] for these products.
    """

    def __init__(self, weights: dict[str, np.ndarray], name: str):
        super().__init__()
        w = np.ascontiguousarray(weights[f"{name}.weight"], dtype=np.float32)
        self.fan_in, self.fan_out = w.shape
        self.split = GEMV_SPLIT if self.fan_out % GEMV_SPLIT == 0 else 1
        blocks = w.reshape(self.fan_in, self.split, self.fan_out // self.split).transpose(1, 0, 2)
        self.weight = _param(blocks)
        bias = weights.get(f"{name}.bias")
        self.bias = _param(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(1, -1, self.fan_in).expand(self.split, -1, self.fan_in)
        y = torch.bmm(rows, self.weight)  # [split, rows, out / split]
        y = y.transpose(0, 1).reshape(x.shape[:-1] + (self.fan_out,))
        return y if self.bias is None else y + self.bias


class _Norm(nn.Module):
    """RMSNorm (llama family, computed as HF does) or LayerNorm with bias (gpt2)."""

    def __init__(self, weights: dict[str, np.ndarray], name: str, eps: float):
        super().__init__()
        self.weight = _param(weights[f"{name}.weight"])
        bias = weights.get(f"{name}.bias")
        self.bias = _param(bias) if bias is not None else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        # one op instead of five (pow, mean, add, rsqrt, mul): the same arithmetic, x * rsqrt(mean(x^2) + eps) * w
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class _MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], prefix: str):
        super().__init__()
        self.gated = spec.mlp == "gated_silu"
        if self.gated:  # gate and up packed into one [hidden, 2 * intermediate] MatMul: one op fewer per layer
            packed = np.concatenate([weights[f"{prefix}.gate.weight"], weights[f"{prefix}.up.weight"]], axis=1)
            self.up = _Linear({f"{prefix}.gate_up.weight": packed}, f"{prefix}.gate_up")
        else:
            self.up = _Linear(weights, f"{prefix}.up")
        self.down = _Linear(weights, f"{prefix}.down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # HF rotate_half
    return x * cos + rotated * sin


class _Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], prefix: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.groups = spec.heads // spec.kv_heads
        self.rope = spec.positions == "rope"
        self.qkv = _Linear(weights, f"{prefix}.qkv")
        self.o = _Linear(weights, f"{prefix}.o")
        self.split = [spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.kv_heads * spec.head_dim]
        self.scale = spec.head_dim ** -0.5

    def forward(self, x, cache, cos, sin, write_index, bias):
        # x [n, S, hidden]; cache [2, n, kv_heads, capacity, head_dim] (a view: written in place);
        # write_index [n, kv_heads, S, head_dim] positions; bias [n, 1, groups * S, T] additive mask (0 or -inf).
        n, steps = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(n, steps, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(n, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = _rotate(q, cos, sin, self.head_dim // 2), _rotate(k, cos, sin, self.head_dim // 2)
        cache[0].scatter_(2, write_index, k)
        cache[1].scatter_(2, write_index, v)
        total = bias.shape[-1]
        keys, values = cache[0, :, :, :total], cache[1, :, :, :total]
        # GQA without repeating the cache: each KV head's query group is folded into the query axis, so every
        # cached key/value is read once per KV head. Plain matmul/softmax (HF's eager attention): for decode
        # the CPU flash kernel's per-call setup costs more than the attention itself.
        q = q.reshape(n, self.kv_heads, self.groups * steps, self.head_dim) * self.scale
        scores = torch.matmul(q, keys.transpose(-1, -2)) + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)  # as HF: softmax in float32
        out = torch.matmul(probs, values)
        out = out.reshape(n, self.heads, steps, self.head_dim).transpose(1, 2).reshape(n, steps, self.heads * self.head_dim)
        return self.o(out)


class _Block(nn.Module):
    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], i: int):
        super().__init__()
        prefix = f"layers.{i}"
        self.attn_norm = _Norm(weights, f"{prefix}.attn_norm", spec.norm_eps)
        self.attn = _Attention(spec, weights, prefix)
        self.mlp_norm = _Norm(weights, f"{prefix}.mlp_norm", spec.norm_eps)
        self.mlp = _MLP(spec, weights, prefix)

    def forward(self, x, cache, cos, sin, write_index, bias):
        x = x + self.attn(self.attn_norm(x), cache, cos, sin, write_index, bias)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """The whole decoder over a runtime-owned stacked KV cache; see the module docstring for the signature."""

    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], max_sequence: int):
        super().__init__()
        self.kv_heads, self.head_dim = spec.kv_heads, spec.head_dim
        self.groups = spec.heads // spec.kv_heads
        self.sliding_window = spec.sliding_window
        self.embed = _param(weights["embed"])
        self.pos_embed = _param(weights["pos_embed"]) if spec.positions == "learned" else None
        if spec.positions == "rope":
            cos, sin = spec.rope_tables(max_sequence)
            self.register_buffer("cos", torch.from_numpy(np.concatenate([cos, cos], axis=-1)))
            self.register_buffer("sin", torch.from_numpy(np.concatenate([sin, sin], axis=-1)))
        else:
            self.cos = self.sin = None
        self.blocks = nn.ModuleList(_Block(spec, weights, i) for i in range(spec.num_layers))
        self.final_norm = _Norm(weights, "final_norm", spec.norm_eps)
        # A separate [hidden, vocab] head even when tied: a second copy of the embedding, but the MatMul
        # layout decodes measurably faster than multiplying by the [vocab, hidden] embedding.
        self.lm_head = _Linear(weights, "lm_head")

    def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions):
        n, steps = input_ids.shape[0], input_ids.shape[1]
        x = F.embedding(input_ids, self.embed)
        cos = sin = None
        if self.pos_embed is not None:
            x = x + F.embedding(position_ids, self.pos_embed)
        else:
            cos = F.embedding(position_ids, self.cos).unsqueeze(1)  # [n, 1, S, head_dim]
            sin = F.embedding(position_ids, self.sin).unsqueeze(1)
        # Key j is visible to the query at position p iff j <= p, the mask keeps j, and (windowed) p - j < W.
        # Key indices come from cumsum, not arange, so the trace bakes in no device or length.
        key_pos = (torch.ones_like(attention_mask).cumsum(1) - 1).unsqueeze(1)  # [n, 1, T]
        query_pos = position_ids.unsqueeze(2)  # [n, S, 1]
        mask = (key_pos <= query_pos) & (attention_mask.unsqueeze(1) == 1)
        if self.sliding_window is not None:
            mask = mask & (query_pos - key_pos < self.sliding_window)
        total = mask.shape[-1]
        # one additive mask for every layer, laid out like the folded query groups: [n, 1, groups * S, T]
        mask = mask.unsqueeze(1).unsqueeze(1).expand(n, 1, self.groups, steps, total)
        bias = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, float("-inf"))
        bias = bias.reshape(n, 1, self.groups * steps, total)
        write_index = position_ids.view(n, 1, steps, 1).expand(n, self.kv_heads, steps, self.head_dim)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache[i], cos, sin, write_index, bias)
        x = x.index_select(1, logit_positions)  # only these positions go through the vocabulary-sized head
        logits = self.lm_head(self.final_norm(x))
        return logits, kv_cache


def example_inputs(spec: DecoderSpec, cache_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Inputs to trace the decoder with (the cache in `cache_dtype`)."""
    n, steps = _TRACE_BATCH, _TRACE_STEPS
    past = torch.tensor(_TRACE_PAST)
    positions = past[:, None] + torch.arange(steps)
    total = past + steps
    mask = (torch.arange(int(total.max()))[None] < total[:, None]).long()
    ids = torch.arange(n * steps).view(n, steps) % spec.vocab
    cache = torch.zeros(spec.num_layers, 2, n, spec.kv_heads, _TRACE_CAPACITY, spec.head_dim, dtype=cache_dtype)
    logit_positions = torch.tensor(_TRACE_LOGIT_POSITIONS)  # K != S, so K stays dynamic too
    return ids, positions, mask, cache, logit_positions


def io_signature(spec: DecoderSpec, cache_dtype: str = "float32") -> IOSignature:
    """`cache_dtype` is the KV cache's element type; the runtime allocates the cache in it."""
    cache_shape = [spec.num_layers, 2, "batch", spec.kv_heads, "capacity", spec.head_dim]
    cache = TensorSpec(name="kv_cache", dtype=cache_dtype, shape=cache_shape)
    return IOSignature(
        inputs=[
            TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="position_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "total_sequence"]),
            cache,
            TensorSpec(name="logit_positions", dtype="int64", shape=["logit_positions"]),
        ],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "logit_positions", spec.vocab]), cache],
        kv_layout="stacked",
    )


def table_length(spec: DecoderSpec, shapes) -> int:
    """Positions the decoder's RoPE tables cover: the artifact's max_sequence (and at least the trace example's);
    a learned-position model cannot go past its own table."""
    if spec.positions == "learned" and shapes.max_sequence > spec.max_positions:
        raise ValueError(f"max_sequence {shapes.max_sequence} exceeds the {spec.max_positions} learned positions "
                         f"of this {spec.model_type} checkpoint")
    return max(shapes.max_sequence, max(_TRACE_PAST) + _TRACE_STEPS)


def export_torchscript(spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path) -> ExportResult:
    """Build the decoder from canonical weights, trace it and save `out_dir/model.pt` (out_dir is the target's own folder)."""
    rope_length = table_length(spec, shapes)
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad(), quiet_jit():
        model = Decoder(spec, weights, rope_length).eval()
        traced = torch.jit.trace(model, example_inputs(spec), check_trace=False)
        torch.jit.save(traced, str(path))
    return ExportResult(files=[path.resolve()], io=io_signature(spec), dtype="float32",
                        toolchain={"torch": torch.__version__})
