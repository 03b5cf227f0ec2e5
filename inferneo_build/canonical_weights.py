"""An HF state dict as the canonical numpy weights every exporter reads (architectures.py says which weights a
family's table entry names, and `DecoderSpec` which switches are on).

Canonical weight names (all matrices are MatMul-ready, i.e. [in_features, out_features]):
    embed                      [vocab, hidden]
    pos_embed                  [max_positions, hidden]        (learned positions only)
    layers.{i}.attn_norm.weight / .bias     before attention (absent: post-norm layers, OLMo 2)
    layers.{i}.post_attn_norm.weight        on the attention output, before the residual add (Gemma 2/3, OLMo 2)
    layers.{i}.q_norm.weight / k_norm.weight  RMSNorm of q and k, per head [head_dim] or whole [heads*head_dim]
    layers.{i}.qkv.weight      [hidden, (heads + 2*kv_heads) * head_dim]  packed Q|K|V
    layers.{i}.qkv.bias        optional
    layers.{i}.o.weight        [heads*head_dim, hidden]   (+ optional .bias)
    layers.{i}.mlp_norm.weight / .bias      before the MLP
    layers.{i}.post_mlp_norm.weight         on the MLP output, before the residual add
    layers.{i}.gate.weight     [hidden, intermediate]         (gated MLPs only)
    layers.{i}.up.weight       [hidden, intermediate]     (+ optional .bias)
    layers.{i}.down.weight     [intermediate, hidden]     (+ optional .bias)
    final_norm.weight / .bias
    lm_head.weight             [hidden, vocab]            absent when tied to `embed` (stored once)

Mixture-of-experts layers (`DecoderSpec.moe_layers`) have, instead of gate/up/down:
    layers.{i}.router.weight           [hidden, experts]
    layers.{i}.experts.gate.weight     [experts, hidden, expert_intermediate]   (.up the same)
    layers.{i}.experts.down.weight     [experts, expert_intermediate, hidden]
    layers.{i}.shared.gate.weight / .up / .down   a dense gated MLP beside the experts (Qwen2-MoE)
    layers.{i}.shared_gate.weight      [hidden, 1]   its output is scaled by sigmoid(x @ shared_gate)
    layers.{i}.router.bias / experts.{gate,up}.bias [experts, expert_intermediate] / experts.down.bias  (gpt-oss)
    layers.{i}.sinks                   [heads]  a learned logit per head beside the keys (gpt-oss's attention sinks)

Folded at load, so no exporter sees them: the norm weight offset (Gemma's 1 + w) and Granite's residual
multiplier (into the o and down projections).
"""
from __future__ import annotations

import numpy as np

from .architectures import ArchSpec, DecoderSpec, MoeNames, UnsupportedArchitecture, arch_for


def canonical_weights(spec: DecoderSpec, state_dict: dict, dtype=np.float32, config=None) -> dict[str, np.ndarray]:
    """Map an HF state dict (torch tensors or numpy arrays) to canonical, MatMul-ready numpy weights.
    `config` supplies multipliers folded into weights (Granite's residual_multiplier)."""
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
    norms = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm")
    for i in range(spec.num_layers):
        def put(canon: str, is_linear: bool = False):
            key = canon.format(i) if "{}" in canon else canon
            template = names.get(canon)
            if template is None:
                return
            value = linear(template.format(i)) if is_linear else fetch(template.format(i))
            if value is not None:
                out[key] = value

        for n in norms:
            put(f"layers.{{}}.{n}.weight"); put(f"layers.{{}}.{n}.bias")
        if spec.attn_sinks:
            out[f"layers.{i}.sinks"] = fetch(names["layers.{}.sinks"].format(i))
        put("layers.{}.o.weight", True); put("layers.{}.o.bias")
        if spec.is_sparse(i):
            out.update(_experts(spec, arch.moe, i, fetch, linear))
            if spec.shared_expert_intermediate:  # None where absent: reported with the other missing weights
                for n in ("shared.gate", "shared.up", "shared.down", "shared_gate"):
                    out[f"layers.{i}.{n}.weight"] = linear(names[f"layers.{{}}.{n}.weight"].format(i))
        else:
            put("layers.{}.gate.weight", True)
            put("layers.{}.up.weight", True); put("layers.{}.up.bias")
            put("layers.{}.down.weight", True); put("layers.{}.down.bias")
        if "layers.{}.gate_up.weight" in names:  # Phi-3: [gate | up] along the output axis
            gate_up = linear(names["layers.{}.gate_up.weight"].format(i))
            out[f"layers.{i}.gate.weight"], out[f"layers.{i}.up.weight"] = (
                np.ascontiguousarray(part) for part in np.split(gate_up, 2, axis=1))
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
    if not spec.tied:
        head = fetch(names["lm_head.weight"])  # lm_head is an nn.Linear [vocab, hidden] in every family (GPT-2 too)
        out["lm_head.weight"] = np.ascontiguousarray(head.T) if head is not None else None
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise UnsupportedArchitecture(f"checkpoint lacks weights for {', '.join(missing)}")
    _fold(spec, arch, out, config)
    return out


def _experts(spec: DecoderSpec, moe: MoeNames, i: int, fetch, linear) -> dict[str, np.ndarray]:
    """Layer i's router and experts in canonical form, from transformers 5's stacked experts or 4.x's modules."""
    router = next((w for w in (linear(n.format(i)) for n in moe.routers) if w is not None), None)
    out = {f"layers.{i}.router.weight": router}
    gate_up, down = (fetch(n.format(i)) for n in moe.stacked)
    if moe.stacked_in_out_interleaved:  # gpt-oss: [E, hidden, 2I] columns gate, up, gate, up, ...; down [E, I, hidden]
        router_bias, gate_up_bias, down_bias = (fetch(n.format(i)) for n in moe.biases)
        out |= {f"layers.{i}.router.bias": router_bias, f"layers.{i}.experts.down.weight": down,
                f"layers.{i}.experts.down.bias": down_bias}
        for kind, both in (("weight", gate_up), ("bias", gate_up_bias)):  # None where absent: reported as missing
            for name, start in (("gate", 0), ("up", 1)):
                out[f"layers.{i}.experts.{name}.{kind}"] = (
                    None if both is None else np.ascontiguousarray(both[..., start::2]))
        return out
    if gate_up is None or down is None:
        per_expert = [[fetch(n.format(i, e=e)) for n in moe.per_expert] for e in range(spec.experts)]
        if any(w is None for ws in per_expert for w in ws):
            out[f"layers.{i}.experts"] = None  # reported with the other missing weights
            return out
        gate_up = np.stack([np.concatenate(ws[:2]) for ws in per_expert])
        down = np.stack([ws[2] for ws in per_expert])
    gate, up = np.split(gate_up, 2, axis=1)  # [experts, intermediate, hidden] each
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        out[f"layers.{i}.experts.{name}.weight"] = np.ascontiguousarray(w.transpose(0, 2, 1))
    return out


def _fold(spec: DecoderSpec, arch: ArchSpec, w: dict[str, np.ndarray], config) -> None:
    """Fold constant multipliers into weights, so exporters never see them."""
    if arch.norm_offset and spec.norm == "rms":  # Gemma: x_normed * (1 + w), computed in float32 as HF does
        for k in w:
            if k.endswith("norm.weight"):
                w[k] = (w[k] + np.float32(arch.norm_offset)).astype(np.float32)
    residual = getattr(config, "residual_multiplier", None) if config is not None else None
    if residual is not None and residual != 1.0:  # Granite: residual + branch * m
        for i in range(spec.num_layers):
            for name in ("o", "down"):
                for part in ("weight", "bias"):
                    key = f"layers.{i}.{name}.{part}"
                    if key in w:
                        w[key] = (w[key] * np.float32(residual)).astype(np.float32)


def head_matrix(spec: DecoderSpec, weights: dict[str, np.ndarray]) -> np.ndarray:
    """lm_head as [hidden, vocab] (a transposed copy of the embedding when tied), for exporters that need one."""
    return weights["lm_head.weight"] if not spec.tied else np.ascontiguousarray(weights["embed"].T)
