"""A checkpoint's RoPE settings, read the same way under transformers 4.57 and 5.x.

transformers 4 keeps `config.rope_theta` and an optional `config.rope_scaling` ({"rope_type" or "type", "factor",
...}); "default" is one of its `ROPE_INIT_FUNCTIONS`. transformers 5 moves everything into
`config.rope_parameters` ({"rope_type": "default", "rope_theta": ..., "factor": ...}, or one such dict per layer
type, e.g. {"full_attention": {...}, "sliding_attention": {...}}), keeps `rope_scaling` only as an alias of it,
drops `config.rope_theta`, and no longer lists "default" in `ROPE_INIT_FUNCTIONS` (each model computes it itself).
Exporters read RoPE through `rope_frequencies` only, so neither major leaks into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Frequencies that do not depend on the sequence length, so they can be baked into a static table.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class RopeConfigError(ValueError):
    """A RoPE setting the exporters cannot represent (the message names the setting and what is supported)."""


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    parameters: dict = field(default_factory=dict)  # the rest of the block: factor, beta_fast, short_factor, ...


def _parameters_block(config, layer_type: Optional[str]) -> dict:
    block = getattr(config, "rope_parameters", None)  # transformers 5
    if block is None:
        block = getattr(config, "rope_scaling", None)  # transformers 4 (None: plain RoPE)
    block = dict(block or {})
    if block and all(isinstance(v, dict) for v in block.values()):  # one block per layer type (transformers 5)
        if layer_type is None:
            raise RopeConfigError(f"{config.model_type}: RoPE differs per layer type ({', '.join(block)}); "
                                  "name the layer type")
        if layer_type not in block:
            raise RopeConfigError(f"{config.model_type}: no RoPE parameters for layer type {layer_type!r} "
                                  f"(config has {', '.join(block)})")
        block = dict(block[layer_type])
    return block


def per_layer_type(config) -> Optional[tuple[str, ...]]:
    """The layer types with their own RoPE block (transformers 5's Gemma 3: full/sliding), or None when one
    block serves every layer."""
    block = getattr(config, "rope_parameters", None)
    if block and all(isinstance(v, dict) for v in dict(block).values()):
        return tuple(block)
    return None


def rope_config(config, layer_type: Optional[str] = None) -> RopeConfig:
    """The RoPE type, base and scaling parameters of an HF config (either transformers major)."""
    block = _parameters_block(config, layer_type)
    rope_type = block.pop("rope_type", None) or block.pop("type", None) or "default"
    block.pop("type", None)
    theta = block.pop("rope_theta", None)
    if theta is None:
        theta = getattr(config, "rope_theta", None) or getattr(config, "default_theta", None) or 10000.0
    partial = block.pop("partial_rotary_factor", None) or getattr(config, "partial_rotary_factor", None) or 1.0
    if rope_type not in STATIC_ROPE_TYPES:
        why = ("depends on the sequence length and cannot be exported statically" if rope_type == "dynamic"
               else "is not supported")
        raise RopeConfigError(f"{config.model_type}: RoPE type {rope_type!r} {why} "
                              f"(supported: {', '.join(STATIC_ROPE_TYPES)})")
    return RopeConfig(rope_type=rope_type, theta=float(theta), partial_rotary_factor=float(partial), parameters=block)


def plain_frequencies(config, theta: float, partial_rotary_factor: float = 1.0) -> tuple[float, ...]:
    """Unscaled RoPE's inverse frequencies with base `theta`, in transformers' float32 arithmetic."""
    import torch

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * partial_rotary_factor)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return tuple(float(x) for x in inv_freq.tolist())


def rope_frequencies(config, layer_type: Optional[str] = None) -> tuple[tuple[float, ...], float]:
    """(inverse frequencies, attention scaling of cos/sin) exactly as the checkpoint's transformers model computes
    them: plain RoPE here (the same float32 arithmetic), every scaled type through transformers' own init function."""
    rope = rope_config(config, layer_type)
    if rope.rope_type == "default":
        return plain_frequencies(config, rope.theta, rope.partial_rotary_factor), 1.0

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS[rope.rope_type]
    # transformers 5 takes the layer type for per-layer blocks; 4.57's functions have no such argument
    inv_freq, attention_scaling = init(config, "cpu", layer_type=layer_type) if layer_type else init(config, "cpu")
    return tuple(float(x) for x in inv_freq.tolist()), float(attention_scaling)
