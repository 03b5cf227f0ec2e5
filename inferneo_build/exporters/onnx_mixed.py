"""The mixed-step graph: one forward that decodes the running rows and prefills a chunk of another prompt.

Chunked prefill interleaves a long prompt with the decode steps of running requests. As two forwards, a step
with a chunk reads every weight twice, so on a CPU it costs at least two decode steps. GroupQueryAttention
cannot take both in one call (several new tokens per row with a filled cache only for batch 1), but everything
else in the decoder works token by token. So this graph lays the rows' tokens and the chunk's tokens out as one
sequence [1, n + c] for the embeddings, norms and MatMuls (one pass over the weights) and splits them only
around attention: each layer has two GroupQueryAttention nodes, the rows' ([n, 1], the target's own past and
present) and the chunk's ([1, c], `chunk_past_key_values.*` / `chunk_present.*`, bound to the chunk's slot).
`logit_positions` indexes that joint sequence. Measured on SmolLM2-135M float32, 2 rows at position 200 and a
chunk at position 1,000 (raw onnxruntime 1.32, medians): a decode step 16.4 ms; with a 16-token chunk as two
forwards 45.5 ms, as one 31.1 ms; with an 8-token chunk 42.5 vs 26.5 ms.

The graph is a rewrite of the target's finished decoder graph (float32 or quantized) and shares its weights
file, so it adds ~150 KB to the artifact. Graphs that read `position_ids` (learned positions, partial rotary,
LongRoPE) take the rows' and the chunk's (`chunk_position_ids`) as one sequence too; LongRoPE's switch, which
looks at each row's last position, is given each token's own row's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import onnx
from onnx import TensorProto, helper

from inferneo_runtime.backends.onnx import CHUNK_PAST, CHUNK_PRESENT, MIXED_GRAPH

_NAME = "/mixed"
# ops whose result for one token depends on the others (per-tensor activation quantization, int8 `dynamic`)
_ACROSS_TOKENS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"})
# A mixture of experts picks each token's experts by comparing router logits: float rounding of ~1e-6, which a
# batch of another shape brings, flips a near tie and changes the token's output entirely. Measured on a random
# 64-expert, top-8 qwen3_moe (int8): the mixed step's cache differed from its two forwards by 0.02 from layer 2
# on, where float32 happened to stay within 4e-6. Such graphs prefill chunks as forwards of their own.
_ROUTED = frozenset({"MoE", "QMoE"})


def write_mixed_graph(model_path: Path) -> Optional[Path]:
    """Write MIXED_GRAPH next to `model_path` (a decoder graph of exporters.onnx, float32 or weight-only
    quantized) and return its path; None for graphs it cannot serve exactly: those that quantize activations
    per tensor, route tokens to experts, or cast the cache on its way in."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if any(n.op_type in _ACROSS_TOKENS or n.op_type in _ROUTED for n in graph.node):
        return None
    if any(x not in inputs for n in graph.node if n.op_type == "GroupQueryAttention" for x in n.input[3:5]):
        return None  # the cache is cast on its way in (fp16): the chunk's buffers could not be bound in place
    _rewrite(graph, inputs)
    out = Path(model_path).with_name(MIXED_GRAPH)
    onnx.save_model(model, str(out))
    onnx.checker.check_model(str(out))  # path-based: the shared weights file is checked too
    return out.resolve()


def _rewrite(graph: onnx.GraphProto, inputs: dict) -> None:
    nodes = list(graph.node)
    embed = [n for n in nodes if n.op_type == "Gather" and list(n.input[1:]) == ["input_ids"]]
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    if len(embed) != 1 or not attention:
        raise ValueError(f"not a decoder graph of exporters.onnx: {len(embed)} token embeddings, "
                         f"{len(attention)} GroupQueryAttention nodes")
    new: list[onnx.NodeProto] = []

    def node(op, ins, name, outputs=1, domain=None, **attrs) -> list[str]:
        outs = [f"{_NAME}/{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        new.append(helper.make_node(op, ins, outs, name=f"{_NAME}/{name}/{op}", domain=domain, **attrs))
        return outs

    def const(name, values) -> str:
        full = f"{_NAME}/constants/{name}"
        graph.initializer.append(helper.make_tensor(full, TensorProto.INT64, [len(values)], values))
        return full

    one, axis1 = const("one", [1]), const("axis_1", [1])
    as_rows, as_sequence = const("as_rows", [-1, 1, 0]), const("as_sequence", [1, -1, 0])

    graph.input.append(helper.make_tensor_value_info("chunk_ids", TensorProto.INT64, [1, "chunk"]))
    graph.input.append(helper.make_tensor_value_info("chunk_attention_mask", TensorProto.INT64, [1, "chunk_total"]))
    for gqa in attention:
        for past, present in ((gqa.input[3], gqa.output[1]), (gqa.input[4], gqa.output[2])):
            layer, kv = past.split(".")[1:3]
            for source, name, where in ((inputs[past], CHUNK_PAST.format(layer, kv), graph.input),
                                        (_output(graph, present), CHUNK_PRESENT.format(layer, kv), graph.output)):
                info = onnx.ValueInfoProto()
                info.CopyFrom(source)
                info.name = name
                info.type.tensor_type.shape.dim[0].dim_value = 1
                where.append(info)

    # the chunk row's seqlens_k / total_sequence_length, as the graph derives the rows' from attention_mask
    total = node("ReduceSum", ["chunk_attention_mask", axis1], "chunk_mask/sum", keepdims=0)[0]
    seqlens = node("Cast", [node("Sub", [total, one], "chunk_mask/sub")[0]], "chunk_mask/seqlens_k",
                   to=TensorProto.INT32)[0]
    length = node("Shape", ["chunk_attention_mask"], "chunk_mask/shape", start=1, end=2)[0]
    length = node("Squeeze", [length], "chunk_mask/total_len")[0]
    length = node("Cast", [length], "chunk_mask/total_len_int32", to=TensorProto.INT32)[0]
    rows = node("Shape", ["input_ids"], "rows", start=0, end=1)[0]
    chunk = node("Shape", ["chunk_ids"], "chunk", start=1, end=2)[0]
    sizes = node("Concat", [rows, chunk], "sizes", axis=0)[0]

    renamed: dict[str, str] = {}
    if "position_ids" in inputs:  # learned positions, rotary nodes: the joint sequence's positions
        graph.input.append(helper.make_tensor_value_info("chunk_position_ids", TensorProto.INT64, [1, "chunk"]))
        rows_positions = node("Reshape", ["position_ids", const("flat", [1, -1])], "positions/rows")[0]
        renamed["position_ids"] = node("Concat", [rows_positions, "chunk_position_ids"], "positions", axis=1)[0]
        # LongRoPE switches on each row's last position (a Slice of position_ids): per token, its own row's
        chunk_last = node("Slice", ["chunk_position_ids", const("last", [-1]), const("end", [2**62]), axis1],
                          "positions/chunk_last")[0]
        chunk_last = node("Expand", [chunk_last, node("Shape", ["chunk_ids"], "positions/chunk_shape")[0]],
                          "positions/chunk_lasts")[0]
        row_lasts = node("Concat", [rows_positions, chunk_last], "positions/row_lasts", axis=1)[0]
        for n in nodes:
            if n.op_type == "Slice" and n.input[0] == "position_ids":
                renamed[n.output[0]] = row_lasts
        nodes = [n for n in nodes if not (n.op_type == "Slice" and n.input[0] == "position_ids")]
    rewritten = list(new)  # the bookkeeping above reads graph inputs only
    new.clear()
    for n in nodes:
        n.input[:] = [renamed.get(x, x) for x in n.input]
        if n is embed[0]:  # [n, 1, hidden] rows + [1, c, hidden] chunk -> [1, n + c, hidden]
            rows_seq = node("Reshape", [n.output[0], as_sequence], "embed/rows")[0]
            chunk_emb = node("Gather", [n.input[0], "chunk_ids"], "embed/chunk", axis=0)[0]
            renamed[n.output[0]] = node("Concat", [rows_seq, chunk_emb], "embed", axis=1)[0]
            rewritten += [n, *new]
        elif n.op_type == "GroupQueryAttention":
            layer = n.output[1].split(".")[1]
            name = f"layers.{layer}"
            rows_qkv, chunk_qkv = [], []  # packed QKV, or q, k and v apart (after q/k norms or rotary nodes)
            for i, x in enumerate(n.input[:3]):
                if not x:
                    rows_qkv.append(x)
                    chunk_qkv.append(x)
                    continue
                rows_x, chunk_x = node("Split", [x, sizes], f"{name}/split_{i}", outputs=2, axis=1)
                rows_qkv.append(node("Reshape", [rows_x, as_rows], f"{name}/rows_{i}")[0])
                chunk_qkv.append(chunk_x)
            rows_node = helper.make_node("GroupQueryAttention", [*rows_qkv, *n.input[3:]],
                                         [f"{_NAME}/{name}/rows_attention", *n.output[1:]],
                                         name=f"{_NAME}/{name}/rows/GroupQueryAttention", domain=n.domain)
            chunk_inputs = [*chunk_qkv, CHUNK_PAST.format(layer, "key"), CHUNK_PAST.format(layer, "value"),
                            seqlens, length, *n.input[7:]]
            chunk_node = helper.make_node("GroupQueryAttention", chunk_inputs,
                                          [f"{_NAME}/{name}/chunk_attention", CHUNK_PRESENT.format(layer, "key"),
                                           CHUNK_PRESENT.format(layer, "value")],
                                          name=f"{_NAME}/{name}/chunk/GroupQueryAttention", domain=n.domain)
            for a in (rows_node, chunk_node):
                a.attribute.extend(n.attribute)
            new += [rows_node, chunk_node]
            rows_out = node("Reshape", [f"{_NAME}/{name}/rows_attention", as_sequence], f"{name}/rows_out")[0]
            renamed[n.output[0]] = node("Concat", [rows_out, f"{_NAME}/{name}/chunk_attention"], f"{name}/attention",
                                        axis=1)[0]
            rewritten += new
        else:
            rewritten.append(n)
        new.clear()
    for out in graph.output:
        if out.name in renamed:  # no graph output is an intermediate the rewrite replaces
            raise ValueError(f"graph output {out.name} would be renamed")
    del graph.node[:]
    graph.node.extend(rewritten)


def _output(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    return next(o for o in graph.output if o.name == name)
