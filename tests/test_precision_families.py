"""Reduced precisions of the fused families beyond Llama: Gemma 3's tiny checkpoint (per-head q/k norms, norms before
and after each branch, sliding windows, two RoPE tables) built to fp16 next to float32."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_recipe_fields

import inferneo_runtime
from inferneo_build import build
from inferneo_build.recipe import Recipe
from inferneo_runtime.generation import GenerationParams

FAMILY = "gemma3_text"
TEXT = "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer. " * 3


@pytest.fixture(scope="module")
def fp16_build(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16-families") / f"tiny-{FAMILY}-fp16"
    fields = tiny_recipe_fields(tiny_checkpoint(FAMILY), f"tiny-{FAMILY}-fp16", out, targets=())
    fields["targets"] = [{"format": "onnx"}, {"format": "onnx", "precision": "fp16"}]  # fp16's default tolerance
    fields["validation"]["perplexity_text"] = TEXT  # a short text: the tiny tokenizer makes the shipped one 10k tokens
    return build(Recipe.model_validate(fields))


def _through_casts(graph, tensor: str, upstream: bool) -> str:
    """`tensor` followed up (to what a Cast read) or down (to what a Cast of it wrote) through Cast nodes."""
    while True:
        if upstream:
            cast = next((n for n in graph.node if n.op_type == "Cast" and n.output[0] == tensor), None)
            if cast is None:
                return tensor
            tensor = cast.input[0]
        else:
            casts = [n for n in graph.node if n.op_type == "Cast" and tensor in n.input]
            if len(casts) != 1:
                return tensor
            tensor = casts[0].output[0]


def _subgraph(model, source: str, result: str):
    """The nodes computing `result` from `source` (and initializers), as a model of their own."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    reached, nodes = {source}, []
    for node in model.graph.node:  # graph order is topological
        ins = [i for i in node.input if i]
        if result in reached or not any(i in reached for i in ins) or not all(i in reached or i in inits for i in ins):
            continue
        nodes.append(node)
        reached.update(node.output)
    assert result in reached, (source, result)
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info(source, TensorProto.FLOAT16, None)],
                              [helper.make_tensor_value_info(result, TensorProto.FLOAT16, None)],
                              initializer=[inits[i] for i in used if i in inits])
    return helper.make_model(graph, opset_imports=list(model.opset_import))


def test_fp16_rms_norms_hold_values_past_float16_squares(fp16_build):
    """Every RMSNorm the graph writes out in standard ops (q/k norms, the norms on each branch's output, the first
    layer's), cut out of the built fp16 graph and run by onnx's reference evaluator, which computes float16 as float16
    (a GPU's kernels do; onnxruntime's CPU provider runs these elementwise ops in float32 and hides it): on inputs up
    to ~1000 (x * x past float16's 65504; Gemma 2/3 and OLMo 2 branch outputs reach that) it gives float32's result.
    The fp16 graph squared in float16: x * x = inf, rstd = 0, every output 0."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    root = fp16_build.output
    model = onnx.load(str(root / "onnx-fp16" / "model.onnx"))
    graph = model.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    squares = [n for n in graph.node if n.op_type == "Mul" and n.name.endswith("/square/Mul")]
    # Gemma 3, 3 layers: q_norm, k_norm, post_attention_norm, post_mlp_norm each, and the first input_layernorm
    assert len(squares) == 13, [n.name for n in squares]
    rng = np.random.default_rng(0)
    for square in squares:
        prefix = square.name.removesuffix("/square/Mul")
        scale = next(n for n in graph.node if n.name == f"{prefix}/scale/Mul")
        add = next(n for n in graph.node if n.name == f"{prefix}/add_eps/Add")
        gamma = next(inits[i] for i in scale.input if i in inits).astype(np.float32)
        eps = float(next(inits[i] for i in add.input if i in inits).reshape(-1)[0])
        source = _through_casts(graph, square.input[0], upstream=True)
        result = _through_casts(graph, scale.output[0], upstream=False)
        sub = _subgraph(model, source, result)
        x = (rng.standard_normal((2, 3, gamma.size)) * 300).astype(np.float16)
        assert np.abs(x.astype(np.float32)).max() > 256  # its squares overflow float16
        (got,) = ReferenceEvaluator(sub).run(None, {source: x})
        xf = x.astype(np.float32)
        want = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps) * gamma
        assert got.dtype == np.float16 and np.all(np.isfinite(got)), prefix
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max(),
                                   err_msg=prefix)


def test_gemma3_fp16_tracks_float32(fp16_build):
    """The fp16 target (with its float32 norms) passes fp16's default tolerance and decodes float32's greedy tokens."""
    m = fp16_build.manifest
    v = m.targets["onnx-fp16"].validation
    assert v.status == "passed" and v.top1_agreement >= 0.98 and v.mean_kl <= 0.005, v
    params = GenerationParams(max_new_tokens=16, ignore_eos=True)
    prompts = ["The quick brown fox", "Hello world, this is a tiny tokenizer. Inferneo compiles"]
    with inferneo_runtime.load(fp16_build.output, target="onnx") as ref, \
            inferneo_runtime.load(fp16_build.output, target="onnx-fp16") as half:
        for prompt in prompts:
            ids = ref.tokenizer.encode(prompt)
            want = ref.generate_ids([ids], params)[0].token_ids
            assert len(set(want)) >= 4, want
            assert half.generate_ids([ids], params)[0].token_ids == want, prompt
