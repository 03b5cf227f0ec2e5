"""Supported decoder architectures as data.

Every exporter consumes one normalized description of a decoder (`DecoderSpec` plus a flat dict of
numpy weights with canonical names), so adding an architecture means adding a table entry here,
not a branch in each exporter.

Canonical weight names (all matrices are MatMul-ready, i.e. [in_features, out_features]):
    embed                      [vocab, hidden]
    pos_embed                  [max_positions, hidden]        (learned positions only)
    layers.{i}.attn_norm.weight / .bias                        (bias: LayerNorm only)
    layers.{i}.qkv.weight      [hidden, (heads + 2*kv_heads) * head_dim]  packed Q|K|V
    layers.{i}.qkv.bias        optional
    layers.{i}.o.weight        [heads*head_dim, hidden]   (+ optional .bias)
    layers.{i}.mlp_norm.weight / .bias
    layers.{i}.gate.weight     [hidden, intermediate]         (gated MLPs only)
    layers.{i}.up.weight       [hidden, intermediate]     (+ optional .bias)
    layers.{i}.down.weight     [intermediate, hidden]     (+ optional .bias)
    final_norm.weight / .bias
    lm_head.weight             [hidden, vocab]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np


class UnsupportedArchitecture(ValueError):
    """The checkpoint's model_type has no entry in ARCHITECTURES."""

    exit_code = 2


@dataclass(frozen=True)
class ArchSpec:
    """How one HF `model_type` maps onto the canonical decoder."""

    family: Literal["llama", "gpt2"]
    norm: Literal["rms", "layer"]
    positions: Literal["rope", "learned"]
    mlp: Literal["gated_silu", "gelu_tanh"]
    # canonical dim name -> HF config attribute (first one present wins)
    config_names: dict[str, tuple[str, ...]]
    # canonical weight name (with {} for the layer index) -> HF state-dict name
    weight_names: dict[str, str]
    # HF stores Linear weights [out, in] (transpose) or Conv1D weights [in, out] (keep)
    transpose_linear: bool = True
    min_transformers: str = "4.45"


_LLAMA_CONFIG = {
    "num_layers": ("num_hidden_layers",),
    "hidden": ("hidden_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "intermediate": ("intermediate_size",),
    "vocab": ("vocab_size",),
    "norm_eps": ("rms_norm_eps",),
    "max_positions": ("max_position_embeddings",),
}
_LLAMA_WEIGHTS = {
    "embed": "model.embed_tokens.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.o.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.o.bias": "model.layers.{}.self_attn.o_proj.bias",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.down.weight": "model.layers.{}.mlp.down_proj.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LLAMA = ArchSpec(family="llama", norm="rms", positions="rope", mlp="gated_silu",
                  config_names=_LLAMA_CONFIG, weight_names=_LLAMA_WEIGHTS)

_GPT2 = ArchSpec(
    family="gpt2", norm="layer", positions="learned", mlp="gelu_tanh", transpose_linear=False,
    config_names={
        "num_layers": ("n_layer",),
        "hidden": ("n_embd",),
        "heads": ("n_head",),
        "kv_heads": ("n_head",),
        "intermediate": ("n_inner",),
        "vocab": ("vocab_size",),
        "norm_eps": ("layer_norm_epsilon",),
        "max_positions": ("n_positions",),
    },
    weight_names={
        "embed": "transformer.wte.weight",
        "pos_embed": "transformer.wpe.weight",
        "layers.{}.attn_norm.weight": "transformer.h.{}.ln_1.weight",
        "layers.{}.attn_norm.bias": "transformer.h.{}.ln_1.bias",
        "layers.{}.qkv.weight": "transformer.h.{}.attn.c_attn.weight",
        "layers.{}.qkv.bias": "transformer.h.{}.attn.c_attn.bias",
        "layers.{}.o.weight": "transformer.h.{}.attn.c_proj.weight",
        "layers.{}.o.bias": "transformer.h.{}.attn.c_proj.bias",
        "layers.{}.mlp_norm.weight": "transformer.h.{}.ln_2.weight",
        "layers.{}.mlp_norm.bias": "transformer.h.{}.ln_2.bias",
        "layers.{}.up.weight": "transformer.h.{}.mlp.c_fc.weight",
        "layers.{}.up.bias": "transformer.h.{}.mlp.c_fc.bias",
        "layers.{}.down.weight": "transformer.h.{}.mlp.c_proj.weight",
        "layers.{}.down.bias": "transformer.h.{}.mlp.c_proj.bias",
        "final_norm.weight": "transformer.ln_f.weight",
        "final_norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
)

# HF model_type -> spec. Mistral and Qwen2 are Llama-shaped (Qwen2 adds q/k/v biases, which the
# optional bias entries pick up).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": _GPT2,
}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


@dataclass(frozen=True)
class DecoderSpec:
    """Dimensions and numerics of a decoder, independent of the HF architecture it came from."""

    model_type: str
    family: Literal["llama", "gpt2"]
    norm: Literal["rms", "layer"]
    positions: Literal["rope", "learned"]
    mlp: Literal["gated_silu", "gelu_tanh"]
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norm_eps: float
    max_positions: int
    sliding_window: int | None = None
    # RoPE: per-pair inverse frequencies and the amplitude scaling (llama3/yarn scale cos/sin)
    rope_inv_freq: tuple[float, ...] = field(default=(), repr=False)
    rope_attention_scaling: float = 1.0

    def rope_tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin tables [length, head_dim // 2] in float32."""
        inv = np.asarray(self.rope_inv_freq, dtype=np.float64)
        angles = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
        scale = self.rope_attention_scaling
        return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "rope_inv_freq"}
        return d


def _config_value(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def decoder_spec(config) -> DecoderSpec:
    """Normalize an HF PretrainedConfig into a DecoderSpec (raises for unsupported settings)."""
    arch = arch_for(config.model_type)
    dims = {name: _config_value(config, attrs) for name, attrs in arch.config_names.items()}
    if dims["intermediate"] is None and arch.family == "gpt2":
        dims["intermediate"] = 4 * dims["hidden"]
    missing = [k for k, v in dims.items() if v is None]
    if missing:
        raise UnsupportedArchitecture(f"{config.model_type} config lacks {', '.join(missing)}")
    head_dim = getattr(config, "head_dim", None) or dims["hidden"] // dims["heads"]

    inv_freq: tuple[float, ...] = ()
    attention_scaling = 1.0
    if arch.positions == "rope":
        inv_freq, attention_scaling = _rope_parameters(config)

    sliding_window = None
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        sliding_window = int(config.sliding_window)
    if arch.family == "gpt2" and getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedArchitecture(f"gpt2 activation {config.activation_function!r} is not supported")

    return DecoderSpec(
        model_type=config.model_type, family=arch.family, norm=arch.norm, positions=arch.positions,
        mlp=arch.mlp, head_dim=int(head_dim), sliding_window=sliding_window,
        rope_inv_freq=inv_freq, rope_attention_scaling=float(attention_scaling),
        **{k: (float(v) if k == "norm_eps" else int(v)) for k, v in dims.items()},
    )


def _rope_parameters(config) -> tuple[tuple[float, ...], float]:
    # transformers 4 and 5 store RoPE differently; rope_config reads both and every static RoPE type
    from .rope_config import RopeConfigError, rope_frequencies

    try:
        return rope_frequencies(config)
    except RopeConfigError as e:
        raise UnsupportedArchitecture(str(e)) from None


def canonical_weights(spec: DecoderSpec, state_dict: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """Map an HF state dict (torch tensors or numpy arrays) to canonical, MatMul-ready numpy weights."""
    arch = arch_for(spec.model_type)

    def fetch(hf_name: str):
        t = state_dict.get(hf_name)
        if t is None:
            return None
        if hasattr(t, "detach"):
            t = t.detach().float().cpu().numpy()
        return np.ascontiguousarray(np.asarray(t, dtype=dtype))

    def linear(hf_name: str):
        w = fetch(hf_name)
        if w is None:
            return None
        return np.ascontiguousarray(w.T) if arch.transpose_linear else w

    out: dict[str, np.ndarray] = {}
    names = arch.weight_names
    out["embed"] = fetch(names["embed"])
    if "pos_embed" in names:
        out["pos_embed"] = fetch(names["pos_embed"])
    for i in range(spec.num_layers):
        def put(canon: str, is_linear: bool = False):
            key = canon.format(i) if "{}" in canon else canon
            template = names.get(canon)
            if template is None:
                return
            value = linear(template.format(i)) if is_linear else fetch(template.format(i))
            if value is not None:
                out[key] = value

        put("layers.{}.attn_norm.weight"); put("layers.{}.attn_norm.bias")
        put("layers.{}.mlp_norm.weight"); put("layers.{}.mlp_norm.bias")
        put("layers.{}.o.weight", True); put("layers.{}.o.bias")
        put("layers.{}.gate.weight", True)
        put("layers.{}.up.weight", True); put("layers.{}.up.bias")
        put("layers.{}.down.weight", True); put("layers.{}.down.bias")
        if "layers.{}.qkv.weight" in names:
            put("layers.{}.qkv.weight", True); put("layers.{}.qkv.bias")
        else:  # pack separate q/k/v projections into one MatMul
            parts = [linear(names[f"layers.{{}}.{p}.weight"].format(i)) for p in "qkv"]
            out[f"layers.{i}.qkv.weight"] = np.ascontiguousarray(np.concatenate(parts, axis=1))
            biases = [fetch(names[f"layers.{{}}.{p}.bias"].format(i)) for p in "qkv"]
            if any(b is not None for b in biases):
                sizes = [p.shape[1] for p in parts]
                biases = [b if b is not None else np.zeros(n, dtype) for b, n in zip(biases, sizes)]
                out[f"layers.{i}.qkv.bias"] = np.concatenate(biases)
    out["final_norm.weight"] = fetch(names["final_norm.weight"])
    if "final_norm.bias" in names:
        out["final_norm.bias"] = fetch(names["final_norm.bias"])
    head = fetch(names["lm_head.weight"])  # lm_head is an nn.Linear [vocab, hidden] in every family (GPT-2 too)
    head = np.ascontiguousarray(head.T) if head is not None else None
    out["lm_head.weight"] = head if head is not None else np.ascontiguousarray(out["embed"].T)
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise UnsupportedArchitecture(f"checkpoint lacks weights for {', '.join(missing)}")
    return out


WeightLoader = Callable[[], dict[str, np.ndarray]]
