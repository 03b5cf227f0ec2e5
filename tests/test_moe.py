"""Mixtures of experts on the fused path beyond float32 parity (test_families covers that for four families): the
quantized onnx targets (QMoE experts, float32 routing), the targets that cannot hold experts, and what the manifest
and the bench record."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import tiny_recipe_fields

from inferneo_build import build
from inferneo_build.recipe import Recipe
from inferneo_runtime.manifest import read_manifest

LENIENT = {"top1_agreement": 0.3, "mean_kl": 0.5, "perplexity_delta": 0.5}  # tiny random models: see test_precision
TEXT = "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer. " * 3


def test_targets_that_cannot_hold_the_experts_are_refused_naming_them(tiny_checkpoint, tmp_path):
    """onnx fp16 (onnxruntime's MoE kernels take float32 or 4/8-bit experts) and .pt2 (torch.export's grouped matmul
    is bfloat16 only) are skipped with the reason when optional; a required one is the recipe's error (exit 2) with
    nothing written. A bfloat16 torchscript builds. The manifest records the routing, and the bench's roofline counts
    only the experts a token reads."""
    from inferneo_build.exporters import TargetUnsupported
    from inferneo_runtime.bench import _target_streamed_bytes

    fields = tiny_recipe_fields(tiny_checkpoint("qwen2_moe"), "tiny-moe", tmp_path / "out")
    fields["targets"] = [{"format": "torchscript"}, {"format": "torchscript", "precision": "bf16", "name": "ts-bf16"},
                         {"format": "onnx", "precision": "fp16", "optional": True}, {"format": "pt2", "optional": True}]
    manifest = read_manifest(build(Recipe.model_validate(fields)).output)
    targets = manifest.targets
    assert targets["torchscript"].status == "valid" and targets["ts-bf16"].status == "valid"
    for name in ("onnx-fp16", "pt2"):
        assert targets[name].status == "skipped", (name, targets[name])
        assert "mixture of experts" in targets[name].validation.reason, targets[name].validation.reason
    model = manifest.model
    assert (model.experts, model.experts_per_token) == (8, 2)
    assert model.expert_parameters == 2 * 8 * 3 * 64 * 32  # 2 sparse layers, 8 experts of 3 [64, 32] matrices
    ts_bytes = sum(f.size for f in targets["torchscript"].files)
    assert _target_streamed_bytes(manifest, "torchscript") == ts_bytes - model.expert_parameters * 4 * 6 // 8
    from rich.console import Console

    from inferneo_runtime.cli_views import show_manifest

    console = Console(record=True, width=200)
    show_manifest(manifest, console)  # `inferneo inspect`
    assert "8 experts, 2 per token" in console.export_text()

    fields["targets"] = [{"format": "onnx", "precision": "fp16"}]
    fields["output"] = str(tmp_path / "out-required")
    with pytest.raises(TargetUnsupported, match="mixture of experts") as e:
        build(Recipe.model_validate(fields))
    assert e.value.exit_code == 2 and not (tmp_path / "out-required").exists()


def test_quantized_targets_hold_the_experts_in_qmoe_and_route_in_float32(tiny_checkpoint, tmp_path):
    """int4 and int8 onnx targets of a mixture of experts: every sparse layer's experts in one QMoE node (4-bit
    blocks of the target's block_size; 8 bits per row), no float MoE node left, the routers' MatMuls float32 (a
    quantized router could pick other experts), and both targets validated and recorded."""
    fields = tiny_recipe_fields(tiny_checkpoint("qwen3_moe-fused"), "tiny-moe-q", tmp_path / "out")
    fields["targets"] = [{"format": "onnx"}, {"format": "onnx", "precision": "int8", "tolerance": LENIENT},
                         {"format": "onnx", "precision": "int4", "tolerance": LENIENT}]
    fields["validation"]["perplexity_text"] = TEXT
    from inferneo_runtime.bench import _target_streamed_bytes

    artifact = build(Recipe.model_validate(fields)).output
    manifest = read_manifest(artifact)
    targets = manifest.targets
    for name, bits, block in (("onnx-int8", 8, None), ("onnx-int4", 4, 32)):
        assert targets[name].status == "valid", targets[name]
        graph = onnx.load(str(artifact / name / "model.onnx"), load_external_data=False).graph
        assert not [n for n in graph.node if n.op_type == "MoE"]
        qmoe = [n for n in graph.node if n.op_type == "QMoE"]
        assert len(qmoe) == 1, [n.name for n in qmoe]  # layer 1 keeps its dense MLP (mlp_only_layers)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
        assert attrs["expert_weight_bits"] == bits and attrs.get("block_size") == block and attrs["k"] == 2
        routers = [n for n in graph.node if "/mlp/router" in n.name and n.op_type in ("MatMul", "MatMulNBits")]
        assert [n.op_type for n in routers] == ["MatMul"], routers
        tool = targets[name].toolchain
        assert "router float32" in tool["quantization"] and "/mlp/router" in tool["float32_matmuls"], tool
        # the bench's roofline: the bytes of the experts a token reads (2 of 8), at the target's bits and scales
        per_parameter = {"onnx-int8": 1.0, "onnx-int4": 0.5 + 4 / 32}[name]
        assert float(tool["expert_bytes_per_parameter"]) == per_parameter
        files = sum(f.size for f in targets[name].files if not f.path.endswith("model.mixed.onnx"))
        unread = int(manifest.model.expert_parameters * per_parameter * 6 / 8) + 512 * 64 * 4  # + the embedding table
        assert 0 < _target_streamed_bytes(manifest, name) == files - unread


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, None)])
def test_qmoe_multiplies_exactly_the_blocks_written(bits, block):
    """The packing and scale layout `expert_blocks` writes is what onnxruntime's QMoE kernel multiplies: its output
    equals the float MoE kernel's over the blocks' dequantized weights (to float32 rounding), and those weights are
    round-to-nearest of the float ones (within half a step)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from inferneo_build.exporters.nbits import expert_blocks, symmetric_blocks

    experts, hidden, inter, rows = 4, 128, 64, 7
    rng = np.random.default_rng(bits)
    fc1 = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32)
    fc2 = rng.standard_normal((experts, hidden, inter)).astype(np.float32)

    def dequantized(w):
        return np.stack([symmetric_blocks(m, block or m.shape[1], bits).dequantized() for m in w])

    def run(op, weights, extra):
        inits = [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()]
        node = helper.make_node(op, ["x", "r", *extra], ["y"], domain="com.microsoft", k=2, activation_type="swiglu",
                                swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                                normalize_routing_weights=1,
                                **({"expert_weight_bits": bits} if op == "QMoE" else {}),
                                **({"block_size": block} if op == "QMoE" and block else {}))
        graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden]),
                                                  helper.make_tensor_value_info("r", TensorProto.FLOAT, [rows, experts])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x, "r": r})[0]

    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    r = rng.standard_normal((rows, experts)).astype(np.float32)
    (w1, s1), (w2, s2) = expert_blocks(fc1, bits, block), expert_blocks(fc2, bits, block)
    quantized = run("QMoE", {"w1": w1, "s1": s1, "w2": w2, "s2": s2}, ["w1", "s1", "", "w2", "s2"])
    d1, d2 = dequantized(fc1), dequantized(fc2)
    reference = run("MoE", {"d1": d1, "d2": d2}, ["d1", "", "d2"])
    assert np.abs(quantized - reference).max() <= 1e-5 * np.abs(reference).max()
    for w, d, s in ((fc1, d1, s1), (fc2, d2, s2)):
        step = np.repeat(s, block, axis=-1) if block else s[..., None]
        assert (np.abs(w - d) <= step / 2 + 1e-6).all()


def test_gpt_oss_as_released_in_mxfp4_builds_from_its_dequantized_experts(tmp_path):
    """gpt-oss ships its experts in MXFP4. The build de-quantizes them with transformers' own de-quantizer (exact:
    4-bit floats times powers of two) instead of refusing the checkpoint as quantized, and the targets decode the
    tokens transformers decodes from the same checkpoint. Any other quantization_config is still refused."""
    import json

    import torch
    import tiny_models
    from transformers import AutoModelForCausalLM, Mxfp4Config

    import inferneo_runtime
    from inferneo_build.build import QuantizedCheckpoint
    from inferneo_runtime.generation import GenerationParams

    checkpoint = tiny_models.make_tiny_mxfp4_checkpoint(tmp_path / "gpt-oss-mxfp4")
    fields = tiny_recipe_fields(checkpoint, "tiny-gpt-oss-mxfp4", tmp_path / "out")
    artifact = build(Recipe.model_validate(fields)).output
    assert {n: t.status for n, t in read_manifest(artifact).targets.items()} == {"onnx": "valid", "torchscript": "valid"}

    # transformers 4.57 leaves the de-quantized experts bfloat16 in a float32 model: cast, as the build does
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager",
                                                 quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    params = GenerationParams(max_new_tokens=16, ignore_eos=True)
    with inferneo_runtime.load(artifact, target="onnx") as runtime:
        ids = runtime.tokenizer.encode("The quick brown fox")
    expected, step_ids, past = [], torch.tensor([ids]), None
    with torch.inference_mode():
        for _ in range(16):
            out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past, step_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
            expected.append(int(step_ids))
    assert len(set(expected)) >= 4, expected
    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(artifact, target=target) as runtime:
            assert runtime.generate_ids([ids], params)[0].token_ids == expected, target

    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (checkpoint / "config.json").write_text(json.dumps(config))
    fields["output"] = str(tmp_path / "out-awq")
    with pytest.raises(QuantizedCheckpoint, match="quant_method=awq"):
        build(Recipe.model_validate(fields))
