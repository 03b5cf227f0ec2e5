"""ONNX exporter: a project-owned onnx.helper builder for a KV-cache decoder (no torch export).

The graph follows the layout measured fastest on CPU (shared/notes/FAST-DECODE.md): one packed QKV MatMul
per layer, com.microsoft GroupQueryAttention with RoPE applied inside (cos/sin caches as initializers),
fused (Skip)SimplifiedLayerNormalization / SkipLayerNormalization, and `seqlens_k` / `total_sequence_length`
derived from `attention_mask` inside the graph. GroupQueryAttention's past and present have the same
[batch, kv_heads, max_cache, head_dim] shape, so the runtime binds both to one buffer and the op appends
in place (no Concat, no copies).

`logit_positions` (int64 [K]) picks the sequence positions whose logits are computed: the final hidden
states are gathered before lm_head, so a prefill that only needs the next token runs the vocabulary-sized
MatMul once instead of once per prompt token ([-1] = last only; 0..S-1 = every position, for validation).
Memory: ONNX Runtime pre-packs every MatMul weight at load (its GEMM layout: ~20% faster decode and ~30%
faster prefill here than unpacked) and then drops the original, while the external data file is memory-mapped.
So the embedding table stays a separate initializer even when tied to lm_head: only the rows that are looked
up become resident, whereas one shared tensor would be held twice (raw for Gather, packed for MatMul). The
vocabulary-sized head is split into column chunks so that packing never holds a whole raw + packed copy at once.

Node names are hierarchical and deterministic (`/model/layers.0/attn/qkv/MatMul`); a node's outputs are
`<node>/output_<i>`. Weights go to one external-data file, written directly (no in-memory protobuf copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from inferneo_runtime.manifest import IOSignature, TensorSpec

from ..architectures import DecoderSpec
from . import ExportResult, TargetUnsupported
from .onnx_mixed import write_mixed_graph

MS_DOMAIN = "com.microsoft"
MIN_OPSET = 17  # LayerNormalization
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
_INLINE_BYTES = 1024  # smaller initializers stay inside model.onnx
_ALIGN = 4096  # offsets in the data file are page-aligned (lets ORT mmap them)
_HEAD_CHUNK_BYTES = 32 << 20  # lm_head columns per initializer (bounds the raw + packed overlap at load)


@dataclass(frozen=True)
class ExpertQuantization:
    """How the quantized targets store a mixture of experts' experts (QMoE): symmetric round-to-nearest at `bits`,
    a scale per block of `block_size` inputs, or per output row where block_size is None."""

    bits: int
    block_size: Optional[int]

    def bytes_per_parameter(self) -> float:
        """What one expert weight costs in the file: its bits, and a float32 scale per block (per row: ~0)."""
        return self.bits / 8 + (4 / self.block_size if self.block_size else 0.0)

    def describe(self) -> str:
        return (f"experts QMoE bits={self.bits} symmetric "
                + (f"block_size={self.block_size}" if self.block_size else "per row"))


# IO as data: name -> (dtype, shape). Strings are symbolic dims; "{kv}"/"{hd}"/"{vocab}" are filled per model.
# The KV entries are per layer; past and present share one shape because the runtime binds them to one buffer.
_INPUTS = {
    "input_ids": ("int64", ["batch", "sequence"]),
    "attention_mask": ("int64", ["batch", "total_sequence"]),
    "position_ids": ("int64", ["batch", "sequence"]),  # learned positions only
    "logit_positions": ("int64", ["logit_positions"]),  # which of the S positions get logits; negative counts from the end
}
_KV_SHAPE = ["batch", "{kv}", "max_cache", "{hd}"]
_LOGITS = ("float32", ["batch", "logit_positions", "{vocab}"])
_ONNX_DTYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "int32": TensorProto.INT32}


def needs_position_ids(spec: DecoderSpec) -> bool:
    """Learned positions, and RoPE that GroupQueryAttention cannot apply itself (partial rotary, LongRoPE's per-row
    switch), read the positions from the input."""
    return spec.positions == "learned" or any(not _fused_rope(spec, r) for r in spec.ropes.values())


def _fused_rope(spec: DecoderSpec, rope) -> bool:
    return rope.long_inv_freq is None and rope.rotary_dim == spec.head_dim


def io_signature(spec: DecoderSpec) -> IOSignature:
    """The graph's inputs and outputs, in graph order; also the manifest's IO entry."""
    dims = {"{kv}": spec.kv_heads, "{hd}": spec.head_dim, "{vocab}": spec.vocab}

    def shape(s):
        return [dims.get(d, d) for d in s]

    names = ["input_ids", "attention_mask"] + (["position_ids"] if needs_position_ids(spec) else []) + ["logit_positions"]
    inputs = [TensorSpec(name=n, dtype=_INPUTS[n][0], shape=_INPUTS[n][1]) for n in names]
    outputs = [TensorSpec(name="logits", dtype=_LOGITS[0], shape=shape(_LOGITS[1]))]
    for i in range(spec.num_layers):
        for kv in ("key", "value"):
            inputs.append(TensorSpec(name=f"past_key_values.{i}.{kv}", dtype="float32", shape=shape(_KV_SHAPE)))
            outputs.append(TensorSpec(name=f"present.{i}.{kv}", dtype="float32", shape=shape(_KV_SHAPE)))
    return IOSignature(inputs=inputs, outputs=outputs, kv_layout="per_layer")


class _GraphBuilder:
    """Collects nodes and initializers; weights are streamed to the external data file as they are added."""

    def __init__(self, data_path: Path, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._data = open(data_path, "wb")
        self._data_name = data_path.name
        self._consts: dict[tuple, str] = {}
        self.offsets: dict[str, int] = {}

    def close(self) -> None:
        self._data.close()

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32 if array.dtype.kind == "f" else array.dtype)
        if array.nbytes < _INLINE_BYTES:
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            return name
        offset = -(-self._data.tell() // _ALIGN) * _ALIGN
        self._data.seek(offset)
        self._data.write(array.tobytes())
        self._external(name, array.dtype, array.shape, offset, array.nbytes)
        self.offsets[name] = offset
        return name

    def _external(self, name: str, dtype, shape, offset: int, length: int) -> None:
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self._data_name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        self.initializers.append(t)

    def rows_of(self, name: str, base: str, array: np.ndarray, start: int, stop: int) -> str:
        """An initializer for rows [start, stop) of the already written `base` (= `array`): the same bytes of the
        data file, not a copy (a tied lm_head's chunks of the embedding)."""
        row = array.shape[1] * array.itemsize
        self._external(name, array.dtype, (stop - start, *array.shape[1:]), self.offsets[base] + start * row,
                       (stop - start) * row)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant initializer (axes, split sizes, scalars)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"/model/constants/{array.dtype.name}_{len(self._consts)}", array)
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attrs) -> list[str]:
        """Add `name` (its op type is appended as the last path component); returns the output names."""
        node_name = f"{name}/{op}"
        if isinstance(outputs, int):
            outputs = [f"{node_name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs

    def reduce(self, op: str, x: str, axes: list[int], name: str, keepdims: int) -> str:
        if op == "ReduceSum" or self.opset >= 18:  # axes became an input in 13 (ReduceSum) / 18 (the rest)
            return self.node(op, [x, self.const(axes)], name, keepdims=keepdims)[0]
        return self.node(op, [x], name, axes=axes, keepdims=keepdims)[0]


def export_onnx(spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path,
                experts: Optional[ExpertQuantization] = None) -> ExportResult:
    """The float32 decoder graph; `experts` (the quantized targets) writes a mixture of experts' experts as
    QMoE blocks instead, since the MatMul quantizers that reduce the rest of the graph cannot reach them."""
    opset = int(getattr(target, "opset", None) or MIN_OPSET)
    if opset < MIN_OPSET:
        raise ValueError(f"onnx opset {opset} is too old; the decoder graph needs opset >= {MIN_OPSET}")
    if spec.positions == "learned" and shapes.max_sequence > spec.max_positions:
        raise TargetUnsupported(f"max_sequence {shapes.max_sequence} exceeds the model's {spec.max_positions} learned positions")
    if spec.head_dim % 16:
        raise TargetUnsupported(f"head_dim {spec.head_dim}: onnxruntime's GroupQueryAttention needs a multiple of 16 "
                         "(use the torchscript target)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, data_path = out / MODEL_NAME, out / DATA_NAME

    g = _GraphBuilder(data_path, opset)
    try:
        _build_decoder(g, spec, weights, shapes.max_sequence, experts)
    finally:
        g.close()

    io = io_signature(spec)

    def value_info(t: TensorSpec):
        return helper.make_tensor_value_info(t.name, _ONNX_DTYPES[t.dtype], t.shape)

    graph = helper.make_graph(g.nodes, "inferneo_decoder", [value_info(t) for t in io.inputs],
                              [value_info(t) for t in io.outputs], initializer=g.initializers)
    model = helper.make_model(graph, producer_name="inferneo", opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = min(model.ir_version, 10)  # ORT >= 1.20 reads IR 10
    onnx.save_model(model, str(model_path))
    onnx.checker.check_model(str(model_path))  # path-based so the external data is checked too
    mixed = write_mixed_graph(model_path)

    return ExportResult(
        files=[model_path.resolve(), data_path.resolve(), *([mixed] if mixed else [])], io=io, dtype="float32",
        toolchain={"onnx": onnx.__version__, "opset": str(opset), "onnxruntime_contrib": f"{MS_DOMAIN}:1"},
    )


def _build_decoder(g: _GraphBuilder, spec: DecoderSpec, w: dict[str, np.ndarray], max_sequence: int,
                   experts: Optional[ExpertQuantization] = None) -> None:
    """Emit the whole decoder; graph inputs/outputs carry the IO contract's names."""
    rms = spec.norm == "rms"
    eps = float(spec.norm_eps)

    # attention bookkeeping shared by every layer, derived from the right-padded attention_mask
    m = "/model/attn_mask"
    total = g.reduce("ReduceSum", "attention_mask", [1], f"{m}/reduce_sum", keepdims=0)
    seqlens = g.node("Sub", [total, g.const(1)], f"{m}/sub")[0]
    seqlens_k = g.node("Cast", [seqlens], f"{m}/seqlens_k", to=TensorProto.INT32)[0]
    shape = g.node("Shape", ["attention_mask"], f"{m}/shape")[0]
    total_len = g.node("Gather", [shape, g.const(1)], f"{m}/total_len", axis=0)[0]
    total_len = g.node("Cast", [total_len], f"{m}/total_len", to=TensorProto.INT32)[0]

    embed = g.weight("model.embed_tokens.weight", w["embed"])
    x = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens")[0]
    if spec.embed_scale != 1.0:  # Gemma sqrt(hidden), Granite embedding_multiplier
        x = g.node("Mul", [x, g.const(spec.embed_scale, np.float32)], "/model/embed_scale")[0]
    if spec.positions == "learned":
        pos = g.node("Gather", [g.weight("model.embed_positions.weight", w["pos_embed"]), "position_ids"],
                     "/model/embed_positions")[0]
        x = g.node("Add", [x, pos], "/model/embed")[0]

    # RoPE tables by name. GroupQueryAttention rotates q and k itself with full-width tables; partial rotary and
    # LongRoPE go through RotaryEmbedding nodes on explicit positions instead (LongRoPE: a row whose sequence
    # passes the switch reads the long-factor rows, stored after the short ones).
    rope_inputs: dict[str, tuple[str, str, str | None]] = {}
    for name, rope in spec.ropes.items():
        cos, sin = rope.tables(max_sequence)
        cos_name = g.weight(f"model.rotary.{name}.cos_cache", cos)
        sin_name = g.weight(f"model.rotary.{name}.sin_cache", sin)
        positions = None
        if not _fused_rope(spec, rope):
            positions = "position_ids"
            if rope.long_inv_freq is not None:
                r = f"/model/rotary.{name}/longrope"
                last = g.node("Slice", ["position_ids", g.const([-1]), g.const([2**62]), g.const([1])], f"{r}/last")[0]
                switched = g.node("Greater", [last, g.const(rope.switch_length - 1)], f"{r}/switched")[0]
                offset = g.node("Mul", [g.node("Cast", [switched], f"{r}/cast", to=TensorProto.INT64)[0],
                                        g.const(max_sequence)], f"{r}/offset")[0]
                positions = g.node("Add", ["position_ids", offset], f"{r}/rows")[0]
        rope_inputs[name] = (cos_name, sin_name, positions)

    def norm(prefix: str, canon: str, hidden: str, residual: str | None, bias: str | None) -> tuple[str, str]:
        """(normed, new residual): fused residual add + norm, or a plain norm when residual is None."""
        gamma = g.weight(f"{prefix}.weight", w[f"{canon}.weight"])
        beta = [g.weight(f"{prefix}.bias", w[f"{canon}.bias"])] if not rms else []
        if residual is None:
            if rms:
                return _rms_norm(g, prefix_node(prefix), hidden, gamma, eps), hidden
            return g.node("LayerNormalization", [hidden, gamma, *beta], prefix_node(prefix), axis=-1,
                          epsilon=eps)[0], hidden
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        name = prefix_node(prefix)
        outs = g.node(op, [hidden, residual, gamma, *beta, *([bias] if bias else [])], name, domain=MS_DOMAIN,
                      outputs=[f"{name}/{op}/output_0", "", "", f"{name}/{op}/output_3"], epsilon=eps)
        return outs[0], outs[3]

    def plain_norm(prefix: str, canon: str, x: str) -> str:
        return norm(prefix, canon, x, None, None)[0]

    def add_residual(hidden: str, residual: str | None, bias: str | None, name: str) -> str:
        """residual + hidden (+ bias) where no norm follows to fuse the add into (post-norm layers)."""
        if bias:
            hidden = g.node("Add", [hidden, bias], f"{name}/bias")[0]
        return hidden if residual is None else g.node("Add", [residual, hidden], f"{name}/residual")[0]

    def prefix_node(prefix: str) -> str:  # "model.layers.0.input_layernorm" -> "/model/layers.0/input_layernorm"
        parts = prefix.split(".")
        if parts[1] == "layers":
            parts = [parts[0], f"layers.{parts[2]}", *parts[3:]]
        return "/" + "/".join(parts)

    def linear(prefix: str, canon: str, x: str, with_bias: bool = True) -> str:
        name = prefix_node(prefix)
        y = g.node("MatMul", [x, g.weight(f"{prefix}.weight", w[f"{canon}.weight"])], name)[0]
        if with_bias and f"{canon}.bias" in w:
            y = g.node("Add", [y, g.weight(f"{prefix}.bias", w[f"{canon}.bias"])], name)[0]
        return y

    def out_bias(prefix: str, canon: str) -> str | None:  # folded into the next Skip*Normalization
        return g.weight(f"{prefix}.bias", w[f"{canon}.bias"]) if f"{canon}.bias" in w else None

    def has(canon: str) -> bool:
        return f"{canon}.weight" in w

    residual = pending_bias = None
    hidden = x
    for i in range(spec.num_layers):
        p, c = f"model.layers.{i}", f"layers.{i}"
        if has(f"{c}.attn_norm"):
            h, residual = norm(f"{p}.input_layernorm", f"{c}.attn_norm", hidden, residual, pending_bias)
        else:  # post-norm layer (OLMo 2): attention reads the residual stream itself
            h = residual = add_residual(hidden, residual, pending_bias, f"/model/layers.{i}/attn_input")
        attn = _attention(g, spec, w, i, p, c, h, seqlens_k, total_len, rope_inputs, linear, plain_norm)
        post = has(f"{c}.post_attn_norm")
        o = linear(f"{p}.attn.o_proj", f"{c}.o", attn, with_bias=post)
        if post:  # sandwich (Gemma 2/3) or post-norm (OLMo 2): normalize the branch before the residual add
            o = plain_norm(f"{p}.post_attention_norm", f"{c}.post_attn_norm", o)
        bias = None if post else out_bias(f"{p}.attn.o_proj", f"{c}.o")
        if has(f"{c}.mlp_norm"):
            h, residual = norm(f"{p}.pre_mlp_layernorm", f"{c}.mlp_norm", o, residual, bias)
        else:
            h = residual = add_residual(o, residual, bias, f"/model/layers.{i}/mlp_input")
        post = has(f"{c}.post_mlp_norm")
        if spec.is_sparse(i):
            hidden = _sparse_mlp(g, spec, w, p, c, h, linear, prefix_node, experts)
        else:
            hidden = _mlp(g, spec, w, p, c, h, linear, prefix_node, with_bias=post)
        if post:
            hidden = plain_norm(f"{p}.post_mlp_norm", f"{c}.post_mlp_norm", hidden)
        pending_bias = None if post else out_bias(f"{p}.mlp.down_proj", f"{c}.down")

    h, _ = norm("model.norm", "final_norm", hidden, residual, pending_bias)
    h = g.node("Gather", [h, "logit_positions"], "/model/logit_positions", axis=1)[0]
    post_ops = spec.logits_divisor != 1.0 or spec.final_softcap is not None
    logits = _lm_head(g, spec, w, h, embed, "/lm_head/output" if post_ops else "logits")
    if spec.logits_divisor != 1.0:  # Granite
        last = spec.final_softcap is None
        logits = g.node("Div", [logits, g.const(spec.logits_divisor, np.float32)], "/logits_scaling",
                        outputs=["logits"] if last else 1)[0]
    if spec.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
        cap = g.const(spec.final_softcap, np.float32)
        t = g.node("Tanh", [g.node("Div", [logits, cap], "/final_softcap/div")[0]], "/final_softcap")[0]
        g.node("Mul", [t, cap], "/final_softcap/mul", outputs=["logits"])


def _attention(g: _GraphBuilder, spec: DecoderSpec, w, i: int, p: str, c: str, h: str, seqlens_k: str,
               total_len: str, rope_inputs, linear, plain_norm) -> str:
    """One layer's GroupQueryAttention (its window, scale, soft-cap and RoPE from the layer's switches)."""
    layer = spec.layers[i]
    name = f"/model/layers.{i}/attn"
    qkv = linear(f"{p}.attn.qkv", f"{c}.qkv", h)
    attrs = dict(num_heads=spec.heads, kv_num_heads=spec.kv_heads, scale=float(spec.scale))
    if layer.window:
        # both count the query's own key: HF attends to keys q-W < k <= q, ORT's window is the same (measured)
        attrs["local_window_size"] = int(layer.window)
    if spec.attn_softcap is not None:
        attrs["softcap"] = float(spec.attn_softcap)
    rope = spec.ropes[layer.rope] if layer.rope else None
    fused_rope = rope is not None and _fused_rope(spec, rope)
    attrs["do_rotary"] = int(fused_rope)
    rotary = list(rope_inputs[layer.rope][:2]) if fused_rope else []
    if fused_rope:
        attrs["rotary_interleaved"] = 0  # HF rotate_half
    if spec.qk_norm is None and (rope is None or fused_rope):
        qkv_inputs = [qkv, "", ""]  # packed: GroupQueryAttention splits it
    else:
        q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        q, k, v = g.node("Split", [qkv, g.const([q_size, kv_size, kv_size])], f"{name}/split", outputs=3, axis=-1)
        if spec.qk_norm == "whole":  # OLMo 2
            q = plain_norm(f"{p}.attn.q_norm", f"{c}.q_norm", q)
            k = plain_norm(f"{p}.attn.k_norm", f"{c}.k_norm", k)
        elif spec.qk_norm == "head":  # Qwen3, Gemma 3: per head, before RoPE
            q = _per_head(g, q, spec.head_dim, lambda t: plain_norm(f"{p}.attn.q_norm", f"{c}.q_norm", t), f"{name}/q_norm")
            k = _per_head(g, k, spec.head_dim, lambda t: plain_norm(f"{p}.attn.k_norm", f"{c}.k_norm", t), f"{name}/k_norm")
        if rope is not None and not fused_rope:
            cos, sin, positions = rope_inputs[layer.rope]
            for label, heads in (("q", spec.heads), ("k", spec.kv_heads)):
                t = q if label == "q" else k
                t = g.node("RotaryEmbedding", [t, positions, cos, sin], f"{name}/{label}_rotary", domain=MS_DOMAIN,
                           interleaved=0, num_heads=heads, rotary_embedding_dim=rope.rotary_dim)[0]
                q, k = (t, k) if label == "q" else (q, t)
        qkv_inputs = [q, k, v]
    attn_name = f"{name}/GroupQueryAttention"
    if spec.attn_sinks:  # gpt-oss: head_sink, after the unused cos/sin, position_ids and attention_bias inputs
        rotary = (rotary or ["", ""]) + ["", "", g.weight(f"{p}.attn.sinks", w[f"{c}.sinks"])]
    return g.node("GroupQueryAttention",
                  [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, *rotary],
                  name, domain=MS_DOMAIN, outputs=[f"{attn_name}/output_0", f"present.{i}.key", f"present.{i}.value"],
                  **attrs)[0]


def _per_head(g: _GraphBuilder, x: str, head_dim: int, fn, name: str) -> str:
    """Apply `fn` over [batch, seq, heads, head_dim] and return [batch, seq, heads * head_dim]."""
    heads = g.node("Reshape", [x, g.const([0, 0, -1, head_dim])], f"{name}/heads")[0]
    return g.node("Reshape", [fn(heads), g.const([0, 0, -1])], f"{name}/merge")[0]


def _lm_head(g: _GraphBuilder, spec: DecoderSpec, w, h: str, embed: str, output: str) -> str:
    """The vocabulary projection, split into column chunks. Tied: Gemm(transB) over row ranges of the embedding's
    own bytes in the data file, so the matrix is stored once."""
    if spec.tied:
        table = w["embed"]  # [vocab, hidden]
        chunks = max(1, -(-table.nbytes // _HEAD_CHUNK_BYTES))
        bounds = np.linspace(0, table.shape[0], chunks + 1).astype(int)
        flat = g.node("Reshape", [h, g.const([-1, spec.hidden])], "/lm_head/flatten")[0]
        parts = [g.node("Gemm", [flat, g.rows_of(f"lm_head.weight.{k}", embed, table, int(a), int(b))],
                        f"/lm_head/chunk.{k}", transB=1)[0] for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        y = parts[0] if chunks == 1 else g.node("Concat", parts, "/lm_head", axis=-1)[0]
        # [batch, K, hidden] -> [batch, K, vocab] as shape arithmetic (no Concat node in a decode graph)
        lead = g.node("Mul", [g.node("Shape", [h], "/lm_head/shape")[0], g.const([1, 1, 0])], "/lm_head/lead")[0]
        shape = g.node("Add", [lead, g.const([0, 0, spec.vocab])], "/lm_head/out_shape")[0]
        return g.node("Reshape", [y, shape], "/lm_head/unflatten", outputs=[output])[0]
    head = w["lm_head.weight"]  # [hidden, vocab]
    chunks = max(1, -(-head.nbytes // _HEAD_CHUNK_BYTES))
    if chunks == 1:
        return g.node("MatMul", [h, g.weight("lm_head.weight", head)], "/lm_head", outputs=[output])[0]
    parts = [g.node("MatMul", [h, g.weight(f"lm_head.weight.{i}", part)], f"/lm_head/chunk.{i}")[0]
             for i, part in enumerate(np.array_split(head, chunks, axis=1))]
    return g.node("Concat", parts, "/lm_head", outputs=[output], axis=-1)[0]


def _mlp(g: _GraphBuilder, spec: DecoderSpec, w, p: str, c: str, h: str, linear, prefix_node,
         with_bias: bool = False) -> str:
    if spec.mlp in ("gated_silu", "gated_gelu", "gated_gelu_tanh"):
        # gate and up packed into one MatMul, then act(gate) * up (same speed as two MatMuls, fewer nodes)
        name = prefix_node(f"{p}.mlp.gate_up_proj")
        packed = np.concatenate([w[f"{c}.gate.weight"], w[f"{c}.up.weight"]], axis=1)
        gate_up = g.node("MatMul", [h, g.weight(f"{p}.mlp.gate_up_proj.weight", packed)], name)[0]
        width = w[f"{c}.gate.weight"].shape[1]
        gate, up = g.node("Split", [gate_up, g.const([width, width])], name, outputs=2, axis=-1)
        if spec.mlp == "gated_silu":
            # SiLU(x) = x * sigmoid(x) is QuickGelu with alpha 1: one fused node instead of Sigmoid + Mul
            act = g.node("QuickGelu", [gate], prefix_node(f"{p}.mlp.act_fn"), domain=MS_DOMAIN, alpha=1.0)[0]
        else:  # Gemma: GELU with the tanh approximation (FastGelu), or exact (Gelu: Gemma 1's "gelu" on 4.x)
            op = "Gelu" if spec.mlp == "gated_gelu" else "FastGelu"
            act = g.node(op, [gate], prefix_node(f"{p}.mlp.act_fn"), domain=MS_DOMAIN)[0]
        y = g.node("Mul", [act, up], prefix_node(f"{p}.mlp"))[0]
    elif spec.mlp == "gelu_tanh":
        up = linear(f"{p}.mlp.up_proj", f"{c}.up", h, with_bias=False)
        bias = [g.weight(f"{p}.mlp.up_proj.bias", w[f"{c}.up.bias"])] if f"{c}.up.bias" in w else []
        y = g.node("FastGelu", [up, *bias], prefix_node(f"{p}.mlp.act_fn"), domain=MS_DOMAIN)[0]
    else:
        raise TargetUnsupported(f"mlp {spec.mlp!r} is not supported by the onnx exporter")
    return linear(f"{p}.mlp.down_proj", f"{c}.down", y, with_bias=with_bias)


def _sparse_mlp(g: _GraphBuilder, spec: DecoderSpec, w, p: str, c: str, h: str, linear, prefix_node,
                quantized: Optional[ExpertQuantization] = None) -> str:
    """Mixture of experts as one com.microsoft MoE node (QMoE with `quantized`): it takes the router's logits per
    row, applies softmax, picks the top k (renormalized where the spec says) and runs only those experts. Its CPU
    kernel wants gate and up interleaved row by row in one [experts, 2 * intermediate, hidden] weight (SwiGLU with
    alpha 1, beta 0 is silu(gate) * up) and down as [experts, hidden, intermediate]."""
    name = prefix_node(f"{p}.mlp")
    logits = linear(f"{p}.mlp.router", f"{c}.router", h)
    rows = g.node("Reshape", [logits, g.const([-1, spec.experts])], f"{name}/router/rows")[0]
    fc1 = _gate_up_rows(*(w[f"{c}.experts.{n}.weight"].transpose(0, 2, 1) for n in ("gate", "up")))
    fc2 = np.ascontiguousarray(w[f"{c}.experts.down.weight"].transpose(0, 2, 1))  # [E, hidden, I]
    biases = ["", ""]  # fc1 (interleaved like its weight), fc2
    if f"{c}.experts.gate.bias" in w:  # gpt-oss
        fc1_bias = _gate_up_rows(w[f"{c}.experts.gate.bias"], w[f"{c}.experts.up.bias"])
        biases = [g.weight(f"{p}.mlp.experts.fc1.bias", fc1_bias),
                  g.weight(f"{p}.mlp.experts.fc2.bias", w[f"{c}.experts.down.bias"])]
    # SwiGLU: silu(gate) * up is alpha 1, beta 0; gpt-oss's is alpha 1.702, beta 1 (up + 1), clamped to the limit
    routing = dict(k=spec.experts_per_token, activation_type="swiglu", swiglu_fusion=1,
                   activation_alpha=float(spec.swiglu_alpha), activation_beta=0.0 if spec.swiglu_limit is None else 1.0,
                   normalize_routing_weights=int(spec.normalize_top_k),
                   **({"swiglu_limit": float(spec.swiglu_limit)} if spec.swiglu_limit is not None else {}))
    if quantized is None:
        y = g.node("MoE", [h, rows, g.weight(f"{p}.mlp.experts.fc1", fc1), biases[0],
                           g.weight(f"{p}.mlp.experts.fc2", fc2), biases[1]], f"{name}/experts", domain=MS_DOMAIN,
                   **routing)[0]
    else:
        from .nbits import expert_blocks

        inputs = [h, rows]
        for fc, weight, bias in (("fc1", fc1, biases[0]), ("fc2", fc2, biases[1])):
            packed, scales = expert_blocks(weight, quantized.bits, quantized.block_size)
            inputs += [g.weight(f"{p}.mlp.experts.{fc}.quantized", packed),
                       g.weight(f"{p}.mlp.experts.{fc}.scales", scales), bias]
        block = {"block_size": quantized.block_size} if quantized.block_size else {}
        y = g.node("QMoE", inputs, f"{name}/experts", domain=MS_DOMAIN, expert_weight_bits=quantized.bits,
                   **block, **routing)[0]
    if not spec.shared_expert_intermediate:
        return y
    # Qwen2-MoE: a dense expert every token takes, scaled by sigmoid(x @ shared_gate)
    shared = _mlp(g, spec, w, f"{p}.mlp.shared_expert", f"{c}.shared", h, linear, prefix_node)
    scale = g.node("Sigmoid", [linear(f"{p}.mlp.shared_expert_gate", f"{c}.shared_gate", h)], f"{name}/shared_gate")[0]
    return g.node("Add", [y, g.node("Mul", [shared, scale], f"{name}/shared")[0]], f"{name}/add_shared")[0]


def _gate_up_rows(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Experts' gate and up ([E, I, ...] each) as one [E, 2I, ...] weight or bias, interleaved row by row (gate 0,
    up 0, gate 1, ...): the SwiGLU layout onnxruntime's MoE kernels take."""
    out = np.empty((gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]), np.float32)
    out[:, 0::2], out[:, 1::2] = gate, up
    return out


def _rms_norm(g: _GraphBuilder, name: str, x: str, gamma: str, eps: float) -> str:
    """RMSNorm from standard ops (SimplifiedLayerNormalization is ORT-only in the ai.onnx domain, which
    onnx.checker rejects). Used where no residual add precedes the norm (the embeddings, q/k norms, the norms on
    a branch's output); every other norm is a fused Skip* op."""
    sq = g.node("Mul", [x, x], f"{name}/square")[0]
    mean = g.reduce("ReduceMean", sq, [-1], f"{name}/mean", keepdims=1)
    var = g.node("Add", [mean, g.const(eps, np.float32)], f"{name}/add_eps")[0]
    rstd = g.node("Reciprocal", [g.node("Sqrt", [var], name)[0]], name)[0]
    return g.node("Mul", [g.node("Mul", [x, rstd], f"{name}/normalize")[0], gamma], f"{name}/scale")[0]
