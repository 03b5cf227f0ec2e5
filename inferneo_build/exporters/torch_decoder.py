"""The project's PyTorch decoder over canonical weights, shared by the TorchScript, .pt2 and TensorRT targets.

Its signature (see `inferneo_runtime.backends.base`):

    logits, kv_cache = Decoder(...)(input_ids[n, S], position_ids[n, S], attention_mask[n, T],
                                    kv_cache[layers, 2, n, kv_heads, capacity, head_dim], logit_positions[K])

`logit_positions` (indices into 0..S-1) picks the positions whose logits are computed, [S-1] for a
prefill that only samples the next token, 0..S-1 for validation; logits are [n, K, vocab].

Like gpt-fast's `KVCache.update`, each layer writes its new keys/values into the cache in place (a
`scatter_` along the position axis, so rows may sit at different positions) and attends over the first
T positions, T = attention_mask.shape[1]. The cache is owned by the runtime, not by the module: the
tensor passed in may be a view of a bigger cache and the writes land in it. Every size is read from the
inputs, so after tracing batch, step length, total length and capacity all stay dynamic.

Two switches serve the other targets: `writes_cache=False` (.pt2, TensorRT) reads the cache and returns the
step's keys/values instead of writing them; `portable=True` (TensorRT) keeps to ops every ONNX opset-17 exporter
and TensorRT's parser take, computes norms in float32 whatever the weights' dtype, and multiplies each weight as
one matrix (the TorchScript target's column blocks are a CPU threading measure). `Decoder.decode` takes the
cache per layer (anything indexable as cache[i][0] / cache[i][1]: the TensorRT graph's separate past tensors).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inferneo_runtime.manifest import TensorSpec

from ..architectures import DecoderSpec

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
    Not `blocked` (portable): the [in, out] weight as it is, one plain product.
    """

    def __init__(self, weights: dict[str, np.ndarray], name: str, blocked: bool = True):
        super().__init__()
        w = np.ascontiguousarray(weights[f"{name}.weight"], dtype=np.float32)
        self.fan_in, self.fan_out = w.shape
        self.blocked = blocked
        self.split = GEMV_SPLIT if self.fan_out % GEMV_SPLIT == 0 else 1
        self.weight = _param(w.reshape(self.fan_in, self.split, self.fan_out // self.split).transpose(1, 0, 2)
                             if blocked else w)
        bias = weights.get(f"{name}.bias")
        self.bias = _param(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            rows = x.reshape(1, -1, self.fan_in).expand(self.split, -1, self.fan_in)
            y = torch.bmm(rows, self.weight)  # [split, rows, out / split]
            y = y.transpose(0, 1).reshape(x.shape[:-1] + (self.fan_out,))
        else:
            y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class _Norm(nn.Module):
    """RMSNorm (llama family, computed as HF does) or LayerNorm with bias (gpt2). Portable: in float32 whatever the
    input's dtype (`Decoder.cast` keeps its weights float32), RMSNorm written out."""

    def __init__(self, weights: dict[str, np.ndarray], name: str, eps: float, portable: bool = False):
        super().__init__()
        self.weight = _param(weights[f"{name}.weight"])
        bias = weights.get(f"{name}.bias")
        self.bias = _param(bias) if bias is not None else None
        self.eps = eps
        self.portable = portable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.portable:
            h = x.float()
            if self.bias is not None:
                h = F.layer_norm(h, self.weight.shape, self.weight, self.bias, self.eps)
            else:
                h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))
            return h.to(x.dtype)
        if self.bias is not None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        # one op instead of five (pow, mean, add, rsqrt, mul): the same arithmetic, x * rsqrt(mean(x^2) + eps) * w
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _optional_norm(weights: dict[str, np.ndarray], name: str, eps: float, portable: bool = False) -> _Norm | None:
    return _Norm(weights, name, eps, portable) if f"{name}.weight" in weights else None


class _MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], prefix: str, blocked: bool = True):
        super().__init__()
        self.gated = spec.mlp in ("gated_silu", "gated_gelu", "gated_gelu_tanh")
        self.silu = spec.mlp == "gated_silu"
        self.gelu_approximate = "none" if spec.mlp == "gated_gelu" else "tanh"
        if self.gated:  # gate and up packed into one [hidden, 2 * intermediate] MatMul: one op fewer per layer
            packed = np.concatenate([weights[f"{prefix}.gate.weight"], weights[f"{prefix}.up.weight"]], axis=1)
            self.up = _Linear({f"{prefix}.gate_up.weight": packed}, f"{prefix}.gate_up", blocked)
        else:
            self.up = _Linear(weights, f"{prefix}.up", blocked)
        self.down = _Linear(weights, f"{prefix}.down", blocked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            gate = F.silu(gate) if self.silu else F.gelu(gate, approximate=self.gelu_approximate)
            return self.down(gate * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class _SparseMLP(nn.Module):
    """Mixture of experts, routed as transformers routes it: softmax over the router's logits (float32), the top
    k, renormalized where the spec says. The (token, expert) pairs are sorted by expert and each expert multiplies
    only its own rows, in two grouped matmuls over the stacked weights; every shape follows the input's, so a
    trace keeps the routing for any input (no per-expert Python loop, no data-dependent shapes)."""

    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], prefix: str, blocked: bool = True):
        super().__init__()
        self.experts, self.top_k, self.normalize = spec.experts, spec.experts_per_token, spec.normalize_top_k
        self.alpha, self.limit = spec.swiglu_alpha, spec.swiglu_limit
        self.router = _param(weights[f"{prefix}.router.weight"])  # [hidden, experts]
        self.gate_up = _param(np.concatenate([weights[f"{prefix}.experts.gate.weight"],
                                              weights[f"{prefix}.experts.up.weight"]], axis=2))  # [E, hidden, 2I]
        self.down = _param(weights[f"{prefix}.experts.down.weight"])  # [E, I, hidden]
        biased = f"{prefix}.experts.down.bias" in weights  # gpt-oss: router, gate|up and down biases
        self.router_bias = _param(weights[f"{prefix}.router.bias"]) if biased else None
        self.gate_up_bias = _param(np.concatenate([weights[f"{prefix}.experts.gate.bias"],
                                                   weights[f"{prefix}.experts.up.bias"]], axis=1)) if biased else None
        self.down_bias = _param(weights[f"{prefix}.experts.down.bias"]) if biased else None
        self.shared = _MLP(spec, weights, f"{prefix}.shared", blocked) if spec.shared_expert_intermediate else None
        self.shared_gate = _param(weights[f"{prefix}.shared_gate.weight"]) if self.shared is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden)
        logits = torch.matmul(rows, self.router)
        if self.router_bias is not None:
            logits = logits + self.router_bias
        probs = torch.softmax(logits.float(), dim=-1)
        top, chosen = torch.topk(probs, self.top_k, dim=-1)  # [rows, k]
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        pairs = chosen.reshape(-1)
        order = torch.argsort(pairs, stable=True)
        token = torch.div(order, self.top_k, rounding_mode="floor")
        # new_zeros: on the input's device when traced on one and run on another (a trace records x.device as is)
        per_expert = pairs.new_zeros(self.experts).index_add_(0, pairs, torch.ones_like(pairs))
        offsets = torch.cumsum(per_expert, 0).to(torch.int32)
        gate_up = F.grouped_mm(rows[token], self.gate_up, offs=offsets)
        expert = pairs[order]
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias[expert]
        gate, up = gate_up.chunk(2, dim=-1)
        if self.limit is None:
            act = F.silu(gate) * up
        else:  # gpt-oss: clamped, and (up + 1) * gate * sigmoid(alpha * gate)
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            act = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        y = F.grouped_mm(act, self.down, offs=offsets)
        if self.down_bias is not None:
            y = y + self.down_bias[expert]
        y = y * top.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(rows).index_add_(0, token, y)
        if self.shared is not None:  # Qwen2-MoE: a dense expert every token takes, scaled by a sigmoid gate
            out = out + torch.sigmoid(torch.matmul(rows, self.shared_gate)) * self.shared(rows)
        return out.reshape(x.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """HF apply_rotary_pos_emb: rotate_half over the first rotary_dim features (all of them unless partial)."""
    if rotary_dim < x.shape[-1]:
        return torch.cat((_rotate(x[..., :rotary_dim], cos, sin, rotary_dim), x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], prefix: str, layer: int,
                 writes_cache: bool = True, portable: bool = False):
        super().__init__()
        self.writes_cache, self.portable = writes_cache, portable
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.groups = spec.heads // spec.kv_heads
        self.rope = spec.layers[layer].rope
        self.rotary_dim = spec.ropes[self.rope].rotary_dim if self.rope else 0
        self.qkv = _Linear(weights, f"{prefix}.qkv", not portable)
        self.o = _Linear(weights, f"{prefix}.o", not portable)
        self.split = [spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.kv_heads * spec.head_dim]
        self.scale = spec.scale
        self.softcap = spec.attn_softcap
        self.qk_norm = spec.qk_norm
        self.q_norm = _optional_norm(weights, f"{prefix}.q_norm", spec.norm_eps, portable)
        self.k_norm = _optional_norm(weights, f"{prefix}.k_norm", spec.norm_eps, portable)
        self.sinks = _param(weights[f"{prefix}.sinks"]) if spec.attn_sinks else None  # gpt-oss [heads]

    def forward(self, x, cache, cos, sin, write_index, bias):
        # x [n, S, hidden]; cache [2, n, kv_heads, capacity, head_dim] (a view: written in place; read-only, any
        # pair of [n, kv_heads, capacity, head_dim] keys and values);
        # write_index [n, kv_heads, S, head_dim] positions; bias [n, 1, groups * S, T] additive mask (0 or -inf),
        # or [n, 1, groups * S, T + S] when the cache is only read (see Decoder). Returns (out, keys, values).
        n, steps = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        if self.qk_norm == "whole":  # OLMo 2: over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(n, steps, self.heads, self.head_dim)
        k = k.view(n, steps, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(n, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope is not None:
            q, k = _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)
        if self.writes_cache:
            cache[0].scatter_(2, write_index, k)
            cache[1].scatter_(2, write_index, v)
            total = bias.shape[-1]
        else:  # the step's own keys/values are attended from k, v; bias masks the cache rows they will replace
            total = bias.shape[-1] - steps
        keys, values = cache[0][:, :, :total], cache[1][:, :, :total]
        # read-only: the step's keys/values apart from the cache's (two products each), or, portable, appended to
        # them (one product: the TensorRT graph, whose builder fuses the concatenation)
        apart = not self.writes_cache and not self.portable
        if not self.writes_cache and self.portable:
            keys, values = torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)
        # GQA without repeating the cache: each KV head's query group is folded into the query axis, so every
        # cached key/value is read once per KV head. Plain matmul/softmax (HF's eager attention): for decode
        # the CPU flash kernel's per-call setup costs more than the attention itself.
        q = q.reshape(n, self.kv_heads, self.groups * steps, self.head_dim) * self.scale
        scores = torch.matmul(q, keys.transpose(-1, -2))
        if apart:
            scores = torch.cat((scores, torch.matmul(q, k.transpose(-1, -2))), dim=-1)
        if self.softcap is not None:  # Gemma 2
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores + bias
        if self.sinks is not None:  # gpt-oss: one more logit per head in the softmax, then dropped
            sink = self.sinks.view(1, self.kv_heads, self.groups, 1, 1).expand(n, -1, -1, steps, -1)
            scores = torch.cat((scores, sink.reshape(n, self.kv_heads, self.groups * steps, 1).to(scores.dtype)), -1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)  # as HF: softmax in float32
        if self.sinks is not None:
            probs = probs[..., :-1]
        if apart:
            out = torch.matmul(probs[..., :total], values) + torch.matmul(probs[..., total:], v)
        else:
            out = torch.matmul(probs, values)
        out = out.reshape(n, self.heads, steps, self.head_dim).transpose(1, 2).reshape(n, steps, self.heads * self.head_dim)
        return self.o(out), k, v


class _Block(nn.Module):
    """Pre-norm (Llama), sandwich (Gemma 2/3: norms before and after each branch) or post-norm (OLMo 2): each
    norm exists when the checkpoint has its weight."""

    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], i: int, writes_cache: bool = True,
                 portable: bool = False):
        super().__init__()
        prefix = f"layers.{i}"
        eps = spec.norm_eps
        self.attn_norm = _optional_norm(weights, f"{prefix}.attn_norm", eps, portable)
        self.post_attn_norm = _optional_norm(weights, f"{prefix}.post_attn_norm", eps, portable)
        self.attn = _Attention(spec, weights, prefix, i, writes_cache, portable)
        self.mlp_norm = _optional_norm(weights, f"{prefix}.mlp_norm", eps, portable)
        self.post_mlp_norm = _optional_norm(weights, f"{prefix}.post_mlp_norm", eps, portable)
        self.mlp = (_SparseMLP if spec.is_sparse(i) else _MLP)(spec, weights, prefix, not portable)
        self.rope, self.window = spec.layers[i].rope, spec.layers[i].window

    def forward(self, x, cache, cos, sin, write_index, bias):
        h, k, v = self.attn(self.attn_norm(x) if self.attn_norm is not None else x, cache, cos, sin, write_index, bias)
        x = x + (self.post_attn_norm(h) if self.post_attn_norm is not None else h)
        h = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else x)
        return x + (self.post_mlp_norm(h) if self.post_mlp_norm is not None else h), k, v


class Decoder(nn.Module):
    """The whole decoder over a runtime-owned stacked KV cache; see the module docstring for the signature.

    `writes_cache=False` (the .pt2 target) leaves the cache untouched and returns the step's keys/values
    [layers, 2, n, kv_heads, S, head_dim] in its place, for the runtime to write. A compiled graph cannot write
    into a view of an input in place: it copied every layer's whole cache once per step (100+ ms per SmolLM2
    token). Reading the cache and attending the step's own keys/values beside it needs no copy.

    `portable=True` (the TensorRT target's ONNX graph): see the module docstring.
    """

    def __init__(self, spec: DecoderSpec, weights: dict[str, np.ndarray], max_sequence: int, writes_cache: bool = True,
                 portable: bool = False):
        super().__init__()
        self.writes_cache, self.portable = writes_cache, portable
        self.kv_heads, self.head_dim = spec.kv_heads, spec.head_dim
        self.groups = spec.heads // spec.kv_heads
        self.embed_scale, self.logits_divisor, self.final_softcap = spec.embed_scale, spec.logits_divisor, spec.final_softcap
        self.embed = _param(weights["embed"])
        self.pos_embed = _param(weights["pos_embed"]) if spec.positions == "learned" else None
        # RoPE tables by name (global, Gemma 3's local); LongRoPE: long-factor rows after the short ones
        self.table_length = max_sequence
        self.rope_switch: dict[str, int | None] = {}
        for name, rope in spec.ropes.items():
            cos, sin = rope.tables(max_sequence)
            self.register_buffer(f"cos_{name}", torch.from_numpy(np.concatenate([cos, cos], axis=-1)))
            self.register_buffer(f"sin_{name}", torch.from_numpy(np.concatenate([sin, sin], axis=-1)))
            self.rope_switch[name] = rope.switch_length if rope.long_inv_freq is not None else None
        self.blocks = nn.ModuleList(_Block(spec, weights, i, writes_cache, portable) for i in range(spec.num_layers))
        self.final_norm = _Norm(weights, "final_norm", spec.norm_eps, portable)
        if spec.tied:  # the embedding itself, stored once; its [vocab, hidden] rows split into GEMV_SPLIT blocks
            self.lm_head = None
            self.head_split = GEMV_SPLIT if spec.vocab % GEMV_SPLIT == 0 else 1
        else:
            # [hidden, vocab] column blocks: the MatMul layout decodes measurably faster than [vocab, hidden]
            self.lm_head = _Linear(weights, "lm_head", not portable)

    def cast(self, dtype: torch.dtype) -> "Decoder":
        """Weights, tables and compute in `dtype`; a portable decoder's norms stay float32."""
        self.to(dtype)
        if self.portable:
            for module in self.modules():
                if isinstance(module, _Norm):
                    module.float()
        return self

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(x)
        if self.portable:
            return torch.matmul(x, self.embed.t())
        hidden = self.embed.shape[1]
        blocks = self.embed.view(self.head_split, -1, hidden).transpose(1, 2)  # [split, hidden, vocab / split]
        rows = x.reshape(1, -1, hidden).expand(self.head_split, -1, hidden)
        y = torch.bmm(rows, blocks).transpose(0, 1)
        return y.reshape(x.shape[:-1] + (self.embed.shape[0],))

    def forward(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions):
        logits, new_kv = self.decode(input_ids, position_ids, attention_mask, kv_cache, logit_positions)
        if self.writes_cache:
            return logits, kv_cache
        return logits, torch.stack([torch.stack(kv) for kv in new_kv])  # [layers, 2, n, kv_heads, S, head_dim]

    def decode(self, input_ids, position_ids, attention_mask, kv_cache, logit_positions=None):
        """(logits, [(keys, values) of the step, per layer]); `kv_cache[i]` is layer i's [2, ...] cache (or its
        (keys, values) pair); logits of every position when `logit_positions` is None."""
        n, steps = input_ids.shape[0], input_ids.shape[1]
        x = F.embedding(input_ids, self.embed)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        tables = {}
        if self.pos_embed is not None:
            x = x + F.embedding(position_ids, self.pos_embed)
        for name, switch in self.rope_switch.items():
            rows = position_ids
            if switch is not None:  # LongRoPE: a call whose sequence passes the switch uses the long factors
                rows = position_ids + (position_ids[:, -1:] + 1 > switch).long() * self.table_length
            tables[name] = (F.embedding(rows, getattr(self, f"cos_{name}")).unsqueeze(1),  # [n, 1, S, rotary_dim]
                            F.embedding(rows, getattr(self, f"sin_{name}")).unsqueeze(1))
        # Key j is visible to the query at position p iff j <= p, the mask keeps j, and (windowed) p - j < W.
        # Key indices come from cumsum, not arange, so the trace bakes in no device or length.
        key_pos = (torch.ones_like(attention_mask).cumsum(1) - 1).unsqueeze(1)  # [n, 1, T]
        query_pos = position_ids.unsqueeze(2)  # [n, S, 1]
        causal = (key_pos <= query_pos) & (attention_mask.unsqueeze(1) == 1)
        if not self.writes_cache:
            # cache rows at this step's positions are stale (the runtime writes them after the call): masked out,
            # and the step's keys (at position_ids) are appended as S more columns
            stale = (key_pos.unsqueeze(-1) == position_ids.view(n, 1, 1, steps)).any(-1)  # [n, 1, T]
            fresh_pos = position_ids.unsqueeze(1)  # [n, 1, S]
            fresh = (fresh_pos <= query_pos) & (attention_mask.gather(1, position_ids).unsqueeze(1) == 1)
            causal = torch.cat((causal & ~stale, fresh), dim=-1)
            key_pos = torch.cat((key_pos, fresh_pos), dim=-1)
        total = causal.shape[-1]
        biases = {}
        for window in {block.window for block in self.blocks}:
            mask = causal if window is None else causal & (query_pos - key_pos < window)
            # one additive mask per window, laid out like the folded query groups: [n, 1, groups * S, T]
            mask = mask.unsqueeze(1).unsqueeze(1).expand(n, 1, self.groups, steps, total)
            bias = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, float("-inf"))
            biases[window] = bias.reshape(n, 1, self.groups * steps, total)
        write_index = position_ids.view(n, 1, steps, 1).expand(n, self.kv_heads, steps, self.head_dim)
        new_kv = []
        for i, block in enumerate(self.blocks):
            cos, sin = tables[block.rope] if block.rope is not None else (None, None)
            x, k, v = block(x, kv_cache[i], cos, sin, write_index, biases[block.window])
            new_kv.append((k, v))  # [n, kv_heads, S, head_dim] each
        if logit_positions is not None:
            x = x.index_select(1, logit_positions)  # only these positions go through the vocabulary-sized head
        logits = self._head(self.final_norm(x))
        if self.logits_divisor != 1.0:  # Granite
            logits = logits / self.logits_divisor
        if self.final_softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits, new_kv


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


def table_length(spec: DecoderSpec, max_sequence: int) -> int:
    """Positions the decoder's RoPE tables cover: the artifact's max_sequence (and at least the trace example's);
    a learned-position model cannot go past its own table."""
    if spec.positions == "learned" and max_sequence > spec.max_positions:
        raise ValueError(f"max_sequence {max_sequence} exceeds the {spec.max_positions} learned positions "
                         f"of this {spec.model_type} checkpoint")
    return max(max_sequence, max(_TRACE_PAST) + _TRACE_STEPS)




def token_inputs() -> list[TensorSpec]:
    """The IO signature's first three inputs, the same for every decoder target."""
    return [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="position_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "total_sequence"])]
