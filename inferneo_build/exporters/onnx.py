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

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from inferneo_runtime.manifest import IOSignature, TensorSpec

from ..architectures import DecoderSpec
from . import ExportResult

MS_DOMAIN = "com.microsoft"
MIN_OPSET = 17  # LayerNormalization
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
_INLINE_BYTES = 1024  # smaller initializers stay inside model.onnx
_ALIGN = 4096  # offsets in the data file are page-aligned (lets ORT mmap them)
_HEAD_CHUNK_BYTES = 32 << 20  # lm_head columns per initializer (bounds the raw + packed overlap at load)

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


def io_signature(spec: DecoderSpec) -> IOSignature:
    """The graph's inputs and outputs, in graph order; also the manifest's IO entry."""
    dims = {"{kv}": spec.kv_heads, "{hd}": spec.head_dim, "{vocab}": spec.vocab}

    def shape(s):
        return [dims.get(d, d) for d in s]

    names = ["input_ids", "attention_mask"] + (["position_ids"] if spec.positions == "learned" else []) + ["logit_positions"]
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
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self._data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=k, value=v)
        self.initializers.append(t)
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


def export_onnx(spec: DecoderSpec, weights: dict[str, np.ndarray], target, shapes, out_dir: Path) -> ExportResult:
    opset = int(getattr(target, "opset", None) or MIN_OPSET)
    if opset < MIN_OPSET:
        raise ValueError(f"onnx opset {opset} is too old; the decoder graph needs opset >= {MIN_OPSET}")
    if spec.positions == "learned" and shapes.max_sequence > spec.max_positions:
        raise ValueError(f"max_sequence {shapes.max_sequence} exceeds the model's {spec.max_positions} learned positions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, data_path = out / MODEL_NAME, out / DATA_NAME

    g = _GraphBuilder(data_path, opset)
    try:
        _build_decoder(g, spec, weights, shapes.max_sequence)
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

    return ExportResult(
        files=[model_path.resolve(), data_path.resolve()], io=io, dtype="float32",
        toolchain={"onnx": onnx.__version__, "opset": str(opset), "onnxruntime_contrib": f"{MS_DOMAIN}:1"},
    )


def _build_decoder(g: _GraphBuilder, spec: DecoderSpec, w: dict[str, np.ndarray], max_sequence: int) -> None:
    """Emit the whole decoder; graph inputs/outputs carry the IO contract's names."""
    rope = spec.positions == "rope"
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

    x = g.node("Gather", [g.weight("model.embed_tokens.weight", w["embed"]), "input_ids"], "/model/embed_tokens")[0]
    if not rope:
        pos = g.node("Gather", [g.weight("model.embed_positions.weight", w["pos_embed"]), "position_ids"],
                     "/model/embed_positions")[0]
        x = g.node("Add", [x, pos], "/model/embed")[0]

    gqa_attrs = dict(num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=int(rope))
    rotary_inputs: list[str] = []
    if rope:
        if 2 * len(spec.rope_inv_freq) != spec.head_dim:
            raise ValueError(f"partial rotary embeddings ({2 * len(spec.rope_inv_freq)} of {spec.head_dim} dims) "
                             "are not supported by the onnx exporter")
        cos, sin = spec.rope_tables(max_sequence)
        rotary_inputs = [g.weight("model.rotary.cos_cache", cos), g.weight("model.rotary.sin_cache", sin)]
        gqa_attrs["rotary_interleaved"] = 0  # HF rotate_half
    if spec.sliding_window:
        # both count the query's own key: HF attends to keys q-W < k <= q, ORT's window is the same (measured)
        gqa_attrs["local_window_size"] = int(spec.sliding_window)

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

    residual = pending_bias = None
    hidden = x
    for i in range(spec.num_layers):
        p, c = f"model.layers.{i}", f"layers.{i}"
        h, residual = norm(f"{p}.input_layernorm", f"{c}.attn_norm", hidden, residual, pending_bias)
        qkv = linear(f"{p}.attn.qkv", f"{c}.qkv", h)
        attn_name = f"/model/layers.{i}/attn/GroupQueryAttention"
        attn = g.node("GroupQueryAttention",
                      [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                       *rotary_inputs], f"/model/layers.{i}/attn", domain=MS_DOMAIN,
                      outputs=[f"{attn_name}/output_0", f"present.{i}.key", f"present.{i}.value"], **gqa_attrs)[0]
        o = linear(f"{p}.attn.o_proj", f"{c}.o", attn, with_bias=False)
        h, residual = norm(f"{p}.post_attention_layernorm", f"{c}.mlp_norm", o, residual,
                           out_bias(f"{p}.attn.o_proj", f"{c}.o"))
        hidden = _mlp(g, spec, w, p, c, h, linear, prefix_node)
        pending_bias = out_bias(f"{p}.mlp.down_proj", f"{c}.down")

    h, _ = norm("model.norm", "final_norm", hidden, residual, pending_bias)
    h = g.node("Gather", [h, "logit_positions"], "/model/logit_positions", axis=1)[0]
    head = w["lm_head.weight"]  # [hidden, vocab]
    chunks = max(1, -(-head.nbytes // _HEAD_CHUNK_BYTES))
    if chunks == 1:
        g.node("MatMul", [h, g.weight("lm_head.weight", head)], "/lm_head", outputs=["logits"])
        return
    parts = [g.node("MatMul", [h, g.weight(f"lm_head.weight.{i}", part)], f"/lm_head/chunk.{i}")[0]
             for i, part in enumerate(np.array_split(head, chunks, axis=1))]
    g.node("Concat", parts, "/lm_head", outputs=["logits"], axis=-1)


def _mlp(g: _GraphBuilder, spec: DecoderSpec, w, p: str, c: str, h: str, linear, prefix_node) -> str:
    if spec.mlp == "gated_silu":
        # gate and up packed into one MatMul, then SiLU(gate) * up (same speed as two MatMuls, fewer nodes)
        name = prefix_node(f"{p}.mlp.gate_up_proj")
        packed = np.concatenate([w[f"{c}.gate.weight"], w[f"{c}.up.weight"]], axis=1)
        gate_up = g.node("MatMul", [h, g.weight(f"{p}.mlp.gate_up_proj.weight", packed)], name)[0]
        gate, up = g.node("Split", [gate_up, g.const([spec.intermediate, spec.intermediate])], name, outputs=2,
                          axis=-1)
        # SiLU(x) = x * sigmoid(x) is QuickGelu with alpha 1: one fused node instead of Sigmoid + Mul
        silu = g.node("QuickGelu", [gate], prefix_node(f"{p}.mlp.act_fn"), domain=MS_DOMAIN, alpha=1.0)[0]
        y = g.node("Mul", [silu, up], prefix_node(f"{p}.mlp"))[0]
    elif spec.mlp == "gelu_tanh":
        up = linear(f"{p}.mlp.up_proj", f"{c}.up", h, with_bias=False)
        bias = [g.weight(f"{p}.mlp.up_proj.bias", w[f"{c}.up.bias"])] if f"{c}.up.bias" in w else []
        y = g.node("FastGelu", [up, *bias], prefix_node(f"{p}.mlp.act_fn"), domain=MS_DOMAIN)[0]
    else:
        raise ValueError(f"mlp {spec.mlp!r} is not supported by the onnx exporter")
    return linear(f"{p}.mlp.down_proj", f"{c}.down", y, with_bias=False)


def _rms_norm(g: _GraphBuilder, name: str, x: str, gamma: str, eps: float) -> str:
    """RMSNorm from standard ops (SimplifiedLayerNormalization is ORT-only in the ai.onnx domain, which
    onnx.checker rejects). Used once, on the embeddings; every later norm is a fused Skip* op."""
    sq = g.node("Mul", [x, x], f"{name}/square")[0]
    mean = g.reduce("ReduceMean", sq, [-1], f"{name}/mean", keepdims=1)
    var = g.node("Add", [mean, g.const(eps, np.float32)], f"{name}/add_eps")[0]
    rstd = g.node("Reciprocal", [g.node("Sqrt", [var], name)[0]], name)[0]
    return g.node("Mul", [g.node("Mul", [x, rstd], f"{name}/normalize")[0], gamma], f"{name}/scale")[0]
