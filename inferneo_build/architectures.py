"""Supported decoder architectures as data.

Every exporter consumes one normalized description of a decoder (`DecoderSpec`, a set of feature switches,
plus a flat dict of numpy weights with canonical names), so adding an architecture means adding a table entry
here, not a branch in each exporter. The switches are read from the HF config where it says them (head_dim,
layer_types, sliding window, RoPE settings, soft-capping, multipliers, tied embeddings, activation) and from the
family's table entry where only the modeling code says them (norm weight offset, q/k norm shape, which norms
exist: a norm is present when its weight is named in the entry).

The weights' canonical names, and how an HF state dict maps onto them, are in canonical_weights.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np


class UnsupportedArchitecture(ValueError):
    """The checkpoint's model_type has no entry in ARCHITECTURES, or uses a setting the fused exporters lack."""

    exit_code = 2


@dataclass(frozen=True)
class ArchSpec:
    """How one HF `model_type` maps onto the canonical decoder."""

    family: Literal["llama", "gpt2"]
    norm: Literal["rms", "layer"]
    positions: Literal["rope", "learned"]
    # canonical dim name -> HF config attribute (first one present wins)
    config_names: dict[str, tuple[str, ...]]
    # canonical weight name (with {} for the layer index) -> HF state-dict name
    weight_names: dict[str, str]
    # HF stores Linear weights [out, in] (transpose) or Conv1D weights [in, out] (keep)
    transpose_linear: bool = True
    min_transformers: str = "4.45"
    norm_offset: float = 0.0          # RMSNorm multiplies by (offset + w): Gemma's 1 + w
    embed_scale_sqrt_hidden: bool = False  # Gemma: embeddings * sqrt(hidden)
    qk_norm: Optional[Literal["head", "whole"]] = None  # RMSNorm of q and k per head (Qwen3, Gemma 3) or whole (OLMo 2)
    attn_softcap: bool = True  # reads attn_logit_softcapping (Gemma 3's config has it, its modeling code drops it)
    moe: Optional["MoeNames"] = None  # sparse MLP layers: where the router and experts live


@dataclass(frozen=True)
class MoeNames:
    """Where a family's sparse MLP keeps its weights (HF state-dict names; {} = layer, {e} = expert). transformers
    4.x holds one module per expert; 5.x stacks them ([experts, 2 * intermediate, hidden] gate|up, and
    [experts, hidden, intermediate] down). Routing, as every such family computes it: softmax over the router's
    logits, the top k, renormalized to sum 1 where the config says so (Mixtral always)."""

    routers: tuple[str, ...]               # the first name present wins
    per_expert: tuple[str, str, str]       # gate, up, down (nn.Linear [out, in])
    stacked: tuple[str, str]               # gate_up, down
    shared: bool = False                   # Qwen2-MoE: a gated dense expert every token takes
    always_normalize: bool = False         # Mixtral has no norm_topk_prob: it always renormalizes
    # gpt-oss: stacked MatMul-ready ([experts, hidden, 2 * intermediate], gate and up interleaved by column), with
    # biases (router, gate_up, down) and its clamped SwiGLU. Its router takes the top k logits and a softmax over
    # them: the softmax over all of them renormalized over the top k, the same weights.
    stacked_in_out_interleaved: bool = False
    biases: Optional[tuple[str, str, str]] = None  # router, gate_up, down


_LLAMA_CONFIG = {
    "num_layers": ("num_hidden_layers",),
    "hidden": ("hidden_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "intermediate": ("intermediate_size",),
    "vocab": ("vocab_size",),
    "norm_eps": ("rms_norm_eps",),
    "max_positions": ("max_position_embeddings",),
    "activation": ("hidden_act",),
}
_LAYER = "model.layers.{}."
_LLAMA_WEIGHTS = {
    "embed": "model.embed_tokens.weight",
    "layers.{}.attn_norm.weight": _LAYER + "input_layernorm.weight",
    "layers.{}.q.weight": _LAYER + "self_attn.q_proj.weight",
    "layers.{}.k.weight": _LAYER + "self_attn.k_proj.weight",
    "layers.{}.v.weight": _LAYER + "self_attn.v_proj.weight",
    "layers.{}.q.bias": _LAYER + "self_attn.q_proj.bias",
    "layers.{}.k.bias": _LAYER + "self_attn.k_proj.bias",
    "layers.{}.v.bias": _LAYER + "self_attn.v_proj.bias",
    "layers.{}.o.weight": _LAYER + "self_attn.o_proj.weight",
    "layers.{}.o.bias": _LAYER + "self_attn.o_proj.bias",
    "layers.{}.mlp_norm.weight": _LAYER + "post_attention_layernorm.weight",
    "layers.{}.gate.weight": _LAYER + "mlp.gate_proj.weight",
    "layers.{}.up.weight": _LAYER + "mlp.up_proj.weight",
    "layers.{}.down.weight": _LAYER + "mlp.down_proj.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_QK_NORM = {"layers.{}.q_norm.weight": _LAYER + "self_attn.q_norm.weight",
            "layers.{}.k_norm.weight": _LAYER + "self_attn.k_norm.weight"}
# Gemma 2/3: a norm before and after both attention and the MLP ("sandwich")
_SANDWICH = {"layers.{}.post_attn_norm.weight": _LAYER + "post_attention_layernorm.weight",
             "layers.{}.mlp_norm.weight": _LAYER + "pre_feedforward_layernorm.weight",
             "layers.{}.post_mlp_norm.weight": _LAYER + "post_feedforward_layernorm.weight"}
# OLMo 2: no norm before attention or the MLP; norms on their outputs instead
_OLMO2_WEIGHTS = {k: v for k, v in _LLAMA_WEIGHTS.items()
                  if k not in ("layers.{}.attn_norm.weight", "layers.{}.mlp_norm.weight")}
_OLMO2_WEIGHTS |= _QK_NORM | {"layers.{}.post_attn_norm.weight": _LAYER + "post_attention_layernorm.weight",
                              "layers.{}.post_mlp_norm.weight": _LAYER + "post_feedforward_layernorm.weight"}
# Phi-3: fused qkv_proj and gate_up_proj (split into the canonical gate/up at load)
_PHI3_WEIGHTS = {k: v for k, v in _LLAMA_WEIGHTS.items()
                 if not k.startswith(("layers.{}.q.", "layers.{}.k.", "layers.{}.v.", "layers.{}.gate.", "layers.{}.up."))}
_PHI3_WEIGHTS |= {"layers.{}.qkv.weight": _LAYER + "self_attn.qkv_proj.weight",
                  "layers.{}.gate_up.weight": _LAYER + "mlp.gate_up_proj.weight"}

_LLAMA = ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG, weight_names=_LLAMA_WEIGHTS)

_QWEN_MOE = MoeNames(
    routers=(_LAYER + "mlp.gate.weight",),
    per_expert=tuple(_LAYER + f"mlp.experts.{{e}}.{n}_proj.weight" for n in ("gate", "up", "down")),
    stacked=(_LAYER + "mlp.experts.gate_up_proj", _LAYER + "mlp.experts.down_proj"))
_MIXTRAL_MOE = MoeNames(
    routers=(_LAYER + "mlp.gate.weight", _LAYER + "block_sparse_moe.gate.weight"),
    per_expert=tuple(_LAYER + f"block_sparse_moe.experts.{{e}}.{n}.weight" for n in ("w1", "w3", "w2")),
    stacked=_QWEN_MOE.stacked, always_normalize=True)
_GPT_OSS_MOE = MoeNames(
    routers=(_LAYER + "mlp.router.weight",), per_expert=(), always_normalize=True,
    stacked=(_LAYER + "mlp.experts.gate_up_proj", _LAYER + "mlp.experts.down_proj"), stacked_in_out_interleaved=True,
    biases=(_LAYER + "mlp.router.bias", _LAYER + "mlp.experts.gate_up_proj_bias", _LAYER + "mlp.experts.down_proj_bias"))
_SHARED_EXPERT = {f"layers.{{}}.shared.{n}.weight": _LAYER + f"mlp.shared_expert.{n}_proj.weight"
                  for n in ("gate", "up", "down")} | {"layers.{}.shared_gate.weight": _LAYER + "mlp.shared_expert_gate.weight"}
# Gemma 2/3's MLP reads hidden_activation; Gemma (1)'s reads hidden_act (transformers 5 maps its legacy "gelu" to
# "gelu_pytorch_tanh" itself; 4.x runs the exact GELU a config's hidden_act says, whatever hidden_activation says,
# and so does the export: the gated_gelu MLP)
_GEMMA_CONFIG = _LLAMA_CONFIG | {"activation": ("hidden_activation", "hidden_act")}
_GEMMA = ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                  weight_names=_LLAMA_WEIGHTS, norm_offset=1.0, embed_scale_sqrt_hidden=True)

_GPT2 = ArchSpec(
    family="gpt2", norm="layer", positions="learned", transpose_linear=False,
    config_names={
        "num_layers": ("n_layer",),
        "hidden": ("n_embd",),
        "heads": ("n_head",),
        "kv_heads": ("n_head",),
        "intermediate": ("n_inner",),
        "vocab": ("vocab_size",),
        "norm_eps": ("layer_norm_epsilon",),
        "max_positions": ("n_positions",),
        "activation": ("activation_function",),
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

# HF model_type -> spec. Everything the config says (head_dim, layer_types, windows, RoPE, soft-caps, multipliers,
# tied embeddings) is read by decoder_spec(); the entry only names weights and what the modeling code hard-codes.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # q/k/v biases: the optional bias entries pick them up
    "granite": _LLAMA,  # multipliers come from the config
    "smollm3": _LLAMA,  # no_rope_layers comes from the config
    "qwen3": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                      weight_names=_LLAMA_WEIGHTS | _QK_NORM, qk_norm="head"),
    "olmo2": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                      weight_names=_OLMO2_WEIGHTS, qk_norm="whole"),
    "phi3": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                     weight_names=_PHI3_WEIGHTS),
    "gemma": _GEMMA,
    "gemma2": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_GEMMA_CONFIG,
                       weight_names=_LLAMA_WEIGHTS | _SANDWICH, norm_offset=1.0, embed_scale_sqrt_hidden=True),
    "gemma3_text": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_GEMMA_CONFIG,
                            weight_names=_LLAMA_WEIGHTS | _SANDWICH | _QK_NORM, norm_offset=1.0,
                            embed_scale_sqrt_hidden=True, qk_norm="head", attn_softcap=False),
    "gpt2": _GPT2,
    # mixture of experts (dense layers, where the config keeps some, read the Llama names)
    "mixtral": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                        weight_names=_LLAMA_WEIGHTS, moe=_MIXTRAL_MOE),
    "qwen3_moe": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                          weight_names=_LLAMA_WEIGHTS | _QK_NORM, qk_norm="head", moe=_QWEN_MOE),
    "qwen2_moe": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                          weight_names=_LLAMA_WEIGHTS | _SHARED_EXPERT,
                          moe=MoeNames(_QWEN_MOE.routers, _QWEN_MOE.per_expert, _QWEN_MOE.stacked, shared=True)),
    "olmoe": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                      weight_names=_LLAMA_WEIGHTS | _QK_NORM, qk_norm="whole", moe=_QWEN_MOE),
    # every layer sparse, attention sinks, q/k/v/o biases, alternating sliding / full layers, YaRN
    "gpt_oss": ArchSpec(family="llama", norm="rms", positions="rope", config_names=_LLAMA_CONFIG,
                        weight_names=_LLAMA_WEIGHTS | {"layers.{}.sinks": _LAYER + "self_attn.sinks"},
                        moe=_GPT_OSS_MOE),
}

# HF activation name -> canonical MLP kind (gated for the Llama-shaped families, plain for GPT-2)
_GATED_MLPS = {"silu": "gated_silu", "gelu": "gated_gelu", "gelu_pytorch_tanh": "gated_gelu_tanh",
               "gelu_tanh": "gated_gelu_tanh"}
_PLAIN_MLPS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} has no fused table entry; fused: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


@dataclass(frozen=True)
class Rope:
    """One RoPE table set: inverse frequencies for the rotated pairs (fewer than head_dim / 2 with partial
    rotary) and the cos/sin amplitude. LongRoPE also has `long_inv_freq`, used for a whole forward call whose
    sequence (past + new tokens) is longer than `switch_length`, as transformers switches it: keys cached
    before the switch keep their short-factor rotation."""

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0
    long_inv_freq: Optional[tuple[float, ...]] = None
    switch_length: Optional[int] = None

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [rows, rotary_dim // 2] float32; with LongRoPE the long-factor rows follow the short ones
        (row = position + length once the call's sequence passes switch_length)."""
        cos, sin = _tables(self.inv_freq, self.attention_scaling, length)
        if self.long_inv_freq is None:
            return cos, sin
        lcos, lsin = _tables(self.long_inv_freq, self.attention_scaling, length)
        return np.concatenate([cos, lcos]), np.concatenate([sin, lsin])


def _tables(inv_freq, scale: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    # float32 as transformers computes them (inv_freq and positions in float32, then cos/sin times the scaling)
    inv = np.asarray(inv_freq, dtype=np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return (np.cos(angles) * np.float32(scale)).astype(np.float32), (np.sin(angles) * np.float32(scale)).astype(np.float32)


@dataclass(frozen=True)
class LayerAttention:
    """Per-layer attention switches (from `layer_types`, `no_rope_layers`, the sliding window)."""

    window: Optional[int] = None       # keys with query - key < window are visible (None: all)
    rope: Optional[str] = "global"     # key into DecoderSpec.ropes; None: no RoPE on this layer


@dataclass(frozen=True)
class DecoderSpec:
    """Dimensions, numerics and feature switches of a decoder, independent of the HF architecture it came from."""

    model_type: str
    family: Literal["llama", "gpt2"]
    norm: Literal["rms", "layer"]
    positions: Literal["rope", "learned"]
    mlp: Literal["gated_silu", "gated_gelu", "gated_gelu_tanh", "gelu_tanh"]
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norm_eps: float
    max_positions: int
    sliding_window: int | None = None  # the window when every layer has the same one (else per layer)
    # RoPE of the global layers, kept flat for exporters that know only uniform layers
    rope_inv_freq: tuple[float, ...] = field(default=(), repr=False)
    rope_attention_scaling: float = 1.0
    # feature switches (defaults: plain Llama / GPT-2)
    layers: tuple[LayerAttention, ...] = ()
    ropes: dict = field(default_factory=dict, repr=False, compare=False)  # name -> Rope
    qk_norm: Optional[Literal["head", "whole"]] = None
    embed_scale: float = 1.0          # Gemma sqrt(hidden) (rounded to float32), Granite embedding_multiplier
    attn_scale: Optional[float] = None  # softmax scale; None: head_dim ** -0.5
    attn_softcap: Optional[float] = None   # scores = cap * tanh(scores / cap)
    final_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap)
    logits_divisor: float = 1.0       # Granite logits_scaling
    tied: bool = False                # lm_head is `embed` (stored once)
    # mixture of experts: which layers are sparse (the rest keep the dense MLP), and how tokens are routed
    moe_layers: tuple[bool, ...] = ()
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    normalize_top_k: bool = False     # the top-k routing weights renormalized to sum 1
    shared_expert_intermediate: int = 0
    # the experts' activation: silu(gate) * up, or gpt-oss's (up + 1) * g * sigmoid(alpha * g) with gate and up
    # clamped to `swiglu_limit` (g = min(gate, limit))
    swiglu_alpha: float = 1.0
    swiglu_limit: Optional[float] = None
    attn_sinks: bool = False          # gpt-oss: layers.{i}.sinks

    def __post_init__(self):
        if not self.layers:
            rope = "global" if self.positions == "rope" else None
            uniform = tuple(LayerAttention(self.sliding_window, rope) for _ in range(self.num_layers))
            object.__setattr__(self, "layers", uniform)
        if self.positions == "rope" and not self.ropes and self.rope_inv_freq:
            object.__setattr__(self, "ropes", {"global": Rope(self.rope_inv_freq, self.rope_attention_scaling)})

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def rope_tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin tables [length, head_dim // 2] of the global RoPE (uniform-layer exporters)."""
        return self.ropes["global"].tables(length)

    def non_uniform_features(self) -> list[str]:
        """Switches beyond plain Llama / GPT-2 in use (exporters that lack them refuse such a spec)."""
        out = []
        if self.mlp in ("gated_gelu", "gated_gelu_tanh"):
            out.append("GELU gated MLP")
        if len({(layer.window, layer.rope) for layer in self.layers}) > 1:
            out.append("per-layer attention types")
        if any(r.long_inv_freq is not None or 2 * len(r.inv_freq) != self.head_dim for r in self.ropes.values()):
            out.append("LongRoPE / partial rotary")
        for name in ("qk_norm", "attn_softcap", "final_softcap", "attn_scale"):
            if getattr(self, name) is not None:
                out.append(name)
        if self.embed_scale != 1.0 or self.logits_divisor != 1.0:
            out.append("embedding / logits multipliers")
        if any(self.moe_layers):
            out.append("mixture of experts")
        if self.attn_sinks:
            out.append("attention sinks")
        return out

    def is_sparse(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("rope_inv_freq", "ropes", "layers")}
        d["layers"] = [{"window": layer.window, "rope": layer.rope} for layer in self.layers]
        return d


def _config_value(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def decoder_spec(config) -> DecoderSpec:
    """Normalize an HF PretrainedConfig into a DecoderSpec (raises UnsupportedArchitecture for anything the fused
    exporters do not cover; the build then takes the generic path)."""
    arch = arch_for(config.model_type)
    dims = {name: _config_value(config, attrs) for name, attrs in arch.config_names.items()}
    if arch.family == "gpt2":
        dims["intermediate"] = dims["intermediate"] or 4 * dims["hidden"]
        dims["activation"] = dims["activation"] or "gelu_new"
    missing = [k for k, v in dims.items() if v is None]
    if missing:
        raise UnsupportedArchitecture(f"{config.model_type} config lacks {', '.join(missing)}")
    activation = dims.pop("activation")
    mlp = (_PLAIN_MLPS if arch.family == "gpt2" else _GATED_MLPS).get(activation)
    if mlp is None:
        raise UnsupportedArchitecture(f"{config.model_type} activation {activation!r} is not supported")
    head_dim = int(getattr(config, "head_dim", None) or dims["hidden"] // dims["heads"])
    layers, ropes, uniform_window = _layer_attention(config, arch, dims["num_layers"])
    if getattr(config, "mlp_bias", False):  # attention biases are picked up by the optional bias entries
        raise UnsupportedArchitecture(f"{config.model_type} mlp_bias=True is not supported")

    embed_scale = 1.0
    if arch.embed_scale_sqrt_hidden:
        embed_scale = float(np.float32(dims["hidden"] ** 0.5))  # transformers rounds the normalizer to the dtype
    embed_scale *= float(getattr(config, "embedding_multiplier", None) or 1.0)
    attn_scale = getattr(config, "attention_multiplier", None)  # Granite: replaces 1 / sqrt(head_dim)
    if getattr(config, "query_pre_attn_scalar", None):  # Gemma 2/3
        attn_scale = float(config.query_pre_attn_scalar) ** -0.5
    glob = ropes.get("global")
    moe = _moe_settings(config, arch, dims["num_layers"], dims["intermediate"]) if arch.moe else {}
    return DecoderSpec(
        model_type=config.model_type, family=arch.family, norm=arch.norm, positions=arch.positions,
        mlp=mlp, head_dim=head_dim, sliding_window=uniform_window,
        rope_inv_freq=glob.inv_freq if glob else (), rope_attention_scaling=glob.attention_scaling if glob else 1.0,
        layers=layers, ropes=ropes, qk_norm=arch.qk_norm, embed_scale=embed_scale,
        attn_scale=float(attn_scale) if attn_scale is not None else None,
        attn_softcap=_positive(getattr(config, "attn_logit_softcapping", None)) if arch.attn_softcap else None,
        final_softcap=_positive(getattr(config, "final_logit_softcapping", None)),
        logits_divisor=float(getattr(config, "logits_scaling", None) or 1.0),
        tied=bool(getattr(config, "tie_word_embeddings", False)), attn_sinks="layers.{}.sinks" in arch.weight_names,
        **moe,
        **{k: (float(v) if k == "norm_eps" else int(v)) for k, v in dims.items()},
    )


def _moe_settings(config, arch: ArchSpec, num_layers: int, intermediate: int) -> dict:
    """A sparse family's routing, read from its config as its modeling code reads it: a layer is sparse unless
    `mlp_only_layers` names it or `decoder_sparse_step` skips it (Qwen2/3-MoE)."""
    if getattr(config, "clip_qkv", None):  # OLMoE's optional clamp of q/k/v
        raise UnsupportedArchitecture(f"{config.model_type} clip_qkv={config.clip_qkv} is not supported")
    experts = int(_config_value(config, ("num_experts", "num_local_experts")) or 0)
    step = int(getattr(config, "decoder_sparse_step", None) or 1)
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    layers = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    return {
        "moe_layers": layers, "experts": experts,
        "experts_per_token": int(config.num_experts_per_tok),
        "expert_intermediate": int(getattr(config, "moe_intermediate_size", None) or intermediate),
        "normalize_top_k": arch.moe.always_normalize or bool(getattr(config, "norm_topk_prob", False)),
        "shared_expert_intermediate": int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        if arch.moe.shared else 0,
        # gpt-oss (transformers 4.57 hard-codes what 5.x reads from the config)
        **({"swiglu_alpha": float(getattr(config, "swiglu_alpha", None) or 1.702),
            "swiglu_limit": float(getattr(config, "swiglu_limit", None) or 7.0)}
           if arch.moe.stacked_in_out_interleaved else {}),
    }


def _positive(value) -> Optional[float]:
    return float(value) if value else None


def _layer_attention(config, arch: ArchSpec, num_layers: int):
    """(per-layer switches, RoPE tables by name, the window when all layers share it)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UnsupportedArchitecture(f"{config.model_type} layer_types {sorted(unknown)} are not supported")
        windows = [int(window) if t == "sliding_attention" and window else None for t in layer_types]
    else:  # Mistral: one window for every layer
        on = window and getattr(config, "use_sliding_window", True)
        windows = [int(window) if on else None] * num_layers
    if arch.positions != "rope":
        return tuple(LayerAttention(w, None) for w in windows), {}, _uniform(windows)

    from .rope_config import per_layer_type

    if per_layer_type(config) and layer_types is not None:  # transformers 5's Gemma 3: a RoPE block per layer type
        table = {"full_attention": "global", "sliding_attention": "local"}
        ropes = {table[t]: rope_for(config, layer_type=t) for t in set(layer_types)}
        names = [table[t] for t in layer_types]
    else:
        ropes = {"global": rope_for(config)}
        names = ["global"] * num_layers
    if getattr(config, "rope_local_base_freq", None) and layer_types is not None:  # Gemma 3 (4.x): local layers' theta
        ropes["local"] = rope_for(config, theta=config.rope_local_base_freq, plain=True)
        names = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    no_rope = getattr(config, "no_rope_layers", None)  # SmolLM3: 1 = this layer uses RoPE
    if no_rope is not None:
        names = [n if use else None for n, use in zip(names, no_rope)]
    return tuple(LayerAttention(w, n) for w, n in zip(windows, names)), ropes, _uniform(windows)


def _uniform(windows: list) -> Optional[int]:
    return windows[0] if len(set(windows)) == 1 else None


def rope_for(config, theta: Optional[float] = None, plain: bool = False, layer_type: Optional[str] = None) -> Rope:
    """The config's RoPE (or a plain one with another theta: Gemma 3's local layers under 4.x; or one layer type's
    block under 5.x), read through rope_config and computed as transformers does, so every scaling type matches."""
    from .rope_config import RopeConfigError, plain_frequencies, rope_config, rope_frequencies

    try:
        rope = rope_config(config, layer_type)
        if plain or theta is not None:
            return Rope(plain_frequencies(config, float(theta if theta is not None else rope.theta),
                                          rope.partial_rotary_factor), 1.0)
        inv_freq, attention_scaling = rope_frequencies(config, layer_type)
    except RopeConfigError as e:
        raise UnsupportedArchitecture(str(e)) from None
    result = Rope(inv_freq, attention_scaling)
    if rope.rope_type == "longrope":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        # transformers: seq_len = max(position_ids) + 1; long factors once seq_len > original_max_position_embeddings
        switch = int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        long_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=switch + 1)
        result = Rope(result.inv_freq, result.attention_scaling, tuple(float(x) for x in long_freq.tolist()), switch)
    return result
