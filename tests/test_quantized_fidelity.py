"""Quantized targets are judged on the shipped evaluation text, record the kernel path their figures were measured
on, and are re-checked on a deploy host against their tolerance rather than the build host's exact tokens."""
from __future__ import annotations

import json
import shutil

import pytest

import inferneo_runtime
from conftest import run_cli, tiny_recipe_fields, write_recipe
from inferneo_build import build, load_recipe
from inferneo_build.evaluation import shipped_documents, windows
from inferneo_build.recipe import Recipe, RecipeError
from inferneo_runtime.cpu_kernels import kernel_path_for, quantized_kernel_path
from inferneo_runtime.errors import GoldenMismatch
from inferneo_runtime.tokenizer import Tokenizer

LENIENT = {"top1_agreement": 0.3, "mean_kl": 0.5, "perplexity_delta": 0.5}


@pytest.fixture(scope="module")
def tiny_quantized(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "tiny-int8"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-int8", out, targets=())
    fields["targets"] = [{"format": "onnx"}, {"format": "onnx", "precision": "int8", "tolerance": LENIENT},
                         {"format": "onnx", "precision": "int4", "name": "onnx-int4-mse", "int4": {"algorithm": "mse"},
                          "tolerance": LENIENT}]
    return build(Recipe.model_validate(fields))


def test_kernel_paths_follow_the_cpu_flags():
    assert kernel_path_for("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}) == "x86_64 avx512vnni"
    assert kernel_path_for("x86_64", {"avx2", "avx512f", "avx512bw"}) == "x86_64 avx512"
    assert kernel_path_for("x86_64", {"avx2", "avx_vnni"}) == "x86_64 avxvnni"
    assert kernel_path_for("x86_64", {"avx2", "fma"}) == "x86_64 avx2"
    assert kernel_path_for("x86_64", {"sse4_2"}) == "x86_64 baseline"
    assert kernel_path_for("aarch64", {"asimd", "asimddp"}) == "aarch64 dotprod"


def test_the_kernel_path_follows_cpuid_where_cpuinfo_says_more(monkeypatch):
    """qemu-user emulating an AVX2 CPU passes the host's /proc/cpuinfo (AVX-512 VNNI here) through, while CPUID,
    which onnxruntime's kernels read, says AVX2: the recorded path must be the one the kernels run."""
    from inferneo_runtime import cpu_kernels

    host = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "sse4_2"}
    monkeypatch.setattr(cpu_kernels, "_proc_flags", lambda: set(host))
    cpuid = {"SSE42": True, "AVX": True, "AVX2": True, "FMA3": True, "AVX512F": False, "AVX512BW": False,
             "AVX512VNNI": False}
    monkeypatch.setattr(cpu_kernels, "_cpuid_features", lambda: dict(cpuid))
    for cached in (cpu_kernels.cpu_flags, cpu_kernels.quantized_kernel_path):
        cached.cache_clear()
    try:
        # the file describes another CPU: CPUID's features only (avx_vnni, which numpy's table lacks, goes too)
        assert cpu_kernels.cpu_flags() == {"avx", "avx2", "fma", "sse4_2"}
        assert cpu_kernels.quantized_kernel_path().endswith(" avx2")
        cpuid.update(AVX512F=True, AVX512BW=True, AVX512VNNI=True)  # the two agree: the file's flags stand
        cpu_kernels.cpu_flags.cache_clear()
        assert cpu_kernels.cpu_flags() == host
        monkeypatch.setattr(cpu_kernels, "_cpuid_features", dict)  # a numpy without the table: cpuinfo stands
        cpu_kernels.cpu_flags.cache_clear()
        assert cpu_kernels.cpu_flags() == host
    finally:
        monkeypatch.undo()
        for cached in (cpu_kernels.cpu_flags, cpu_kernels.quantized_kernel_path):
            cached.cache_clear()


def test_the_shipped_text_is_prose_code_and_dialogue(tiny_quantized):
    names = [n for n, _ in shipped_documents()]
    assert names == ["code", "dialogue", "prose"]
    tokenizer = Tokenizer(tiny_quantized.output)
    expected = sum(len(w) for _, text in shipped_documents() for w in windows(tokenizer.encode(text), 128))
    report = json.loads((tiny_quantized.output / "validation.json").read_text())["evaluation_text"]
    assert report["source"].startswith("builtin") and report["tokens"] == expected > 2000


def test_quantized_figures_come_from_the_evaluation_text_and_name_the_kernel_path(tiny_quantized):
    m = tiny_quantized.manifest
    v = m.targets["onnx-int8"].validation
    report = json.loads((tiny_quantized.output / "validation.json").read_text())
    assert v.evaluation_tokens == report["evaluation_text"]["tokens"]
    assert v.positions > v.evaluation_tokens  # the prompts' reference sequences count too
    assert v.kernel_path == quantized_kernel_path()
    assert v.perplexity is not None and v.reference_perplexity is not None
    assert m.targets["onnx"].validation.kernel_path is None  # float32 does not depend on the int8 kernels
    r = run_cli("inspect", str(tiny_quantized.output), "--json")
    assert json.loads(r.stdout)["targets"]["onnx-int8"]["validation"]["kernel_path"] == quantized_kernel_path()


def test_the_kernel_path_tool_scores_targets_as_the_build_did(tiny_quantized, tmp_path):
    """tools/kernel_path_check.py (run under qemu for another CPU's kernels) scored natively: the float32 target
    against its own logits is exact, and the int8 target's figures are the build's, over the same evaluation text
    (the build's reference is PyTorch and also counts the prompts: close, not equal)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("kernel_path_check",
                                                  Path(__file__).parents[1] / "tools" / "kernel_path_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.write_reference(tiny_quantized.output, "onnx", tmp_path)
    itself = tool.score(tiny_quantized.output, "onnx", tmp_path)
    assert itself["top1_agreement"] == 1.0 and itself["mean_kl"] < 1e-9 and abs(itself["perplexity_delta"]) < 1e-6
    got = tool.score(tiny_quantized.output, "onnx-int8", tmp_path)
    v = tiny_quantized.manifest.targets["onnx-int8"].validation
    assert got["positions"] == v.evaluation_tokens and got["kernel_path"] == v.kernel_path
    assert abs(got["top1_agreement"] - v.top1_agreement) < 0.02 and got["top1_agreement"] < 1.0
    assert abs(got["mean_kl"] - v.mean_kl) < 0.2 * v.mean_kl, (got, v)


def test_a_recipe_names_its_own_evaluation_text(tiny_checkpoint, tmp_path):
    text = tmp_path / "domain.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "own-text", tmp_path / "out", targets=())
    fields["targets"] = [{"format": "onnx", "precision": "int8", "tolerance": LENIENT}]
    fields["validation"]["evaluation_files"] = [str(text)]
    result = build(load_recipe(write_recipe(tmp_path / "r.yaml", **fields)))
    report = json.loads((result.output / "validation.json").read_text())["evaluation_text"]
    tokenizer = Tokenizer(result.output)
    assert report["source"] == "recipe evaluation_files"
    assert report["tokens"] == sum(len(w) for w in windows(tokenizer.encode(text.read_text()), 128))

    fields["validation"]["evaluation_files"] = [str(tmp_path / "missing.txt")]
    with pytest.raises(RecipeError, match=r"r2.yaml:\d+: validation.evaluation_files.0: file .*missing.txt not found"):
        load_recipe(write_recipe(tmp_path / "r2.yaml", **fields))
    fields["validation"].update(evaluation_files=[str(text)], perplexity_text="inline")
    with pytest.raises(RecipeError, match="perplexity_text or evaluation_files, not both"):
        load_recipe(write_recipe(tmp_path / "r3.yaml", **fields))


def _copy_with_goldens(src, dst, edit):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "inferneo.json").read_text())
    edit(raw)
    (dst / "inferneo.json").write_text(json.dumps(raw))
    return dst


def test_deploy_host_check_holds_a_quantized_target_to_its_tolerance(tiny_quantized, tmp_path):
    root = tiny_quantized.output
    # Another CPU's int8 kernel may pick other greedy tokens: the target's own recorded tokens no longer replay,
    # but agreement with the reference's tokens still meets the tolerance, so the target passes and says so.
    def other_host_tokens(raw):
        for g in raw["targets"]["onnx-int8"]["goldens"]:
            g["tokens"] = [(t + 1) % 512 for t in g["tokens"]]

    other = _copy_with_goldens(root, tmp_path / "other-host", other_host_tokens)
    r = run_cli("validate", str(other), "--target", "onnx-int8", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    t = json.loads(r.stdout)["targets"]["onnx-int8"]
    assert t["status"] == "passed" and t["criterion"] == "tolerance" and t["exact_goldens"] == 0
    assert t["top1_agreement"] >= LENIENT["top1_agreement"] and t["kernel_path"] == quantized_kernel_path()
    assert t["positions"] == sum(len(g["tokens"]) for g in json.loads((root / "inferneo.json").read_text())["goldens"])
    r = run_cli("validate", str(other), "--target", "onnx-int8")
    assert "top-1 agreement" in r.stdout and quantized_kernel_path() in r.stdout

    # A target that really drifted from the reference fails, naming the figure, the tolerance and both paths.
    def drifted_reference(raw):
        for g in raw["goldens"]:
            g["tokens"] = [(t + 7) % 512 for t in g["tokens"]]

    drifted = _copy_with_goldens(root, tmp_path / "drifted", drifted_reference)
    r = run_cli("validate", str(drifted), "--target", "onnx-int8", "--json")
    assert r.returncode == 6, r.stdout + r.stderr
    reason = json.loads(r.stdout)["targets"]["onnx-int8"]["reason"]
    assert "below its tolerance 0.3" in reason and quantized_kernel_path() in reason
    with inferneo_runtime.load(drifted, target="onnx") as model:  # float32 stays exact: drifted goldens fail it
        with pytest.raises(GoldenMismatch, match="diverges at token 0"):
            model.check_goldens()


def test_mse_int4_runs_on_onnxruntimes_kernel_and_beats_round_to_nearest():
    """The searched scales reconstruct blocks closer than the range's scale, and the packed MatMulNBits node
    onnxruntime runs computes exactly the dequantized weights' product."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from inferneo_build.exporters import int4_mse, nbits

    k, n = 256, 96
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[3, 5] = 0.9  # an outlier stretches its block's range
    q, scales, zero = int4_mse.quantize_blocks(w.T, 32)
    dequantized = (scales[..., None] * (q.astype(np.float32) - zero[..., None])).reshape(n, k)
    blocks = w.T.reshape(n, -1, 32)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    step = (hi - lo) / 15
    zp = np.clip(np.round(-lo / step), 0, 15)
    rtn = (step[..., None] * (np.clip(np.round(blocks / step[..., None]) + zp[..., None], 0, 15) - zp[..., None]))
    assert np.square(dequantized - w.T).mean() < np.square(rtn.reshape(n, k) - w.T).mean()

    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(w, "W")])
    model = nbits.quantize_matmuls(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                   lambda name, weight: int4_mse.mse_blocks(weight, 32), 32, 0)
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"A": a})[0], a @ dequantized.T, rtol=1e-4, atol=1e-4)


def test_mse_int4_target_builds_and_validates(tiny_quantized):
    entry = tiny_quantized.manifest.targets["onnx-int4-mse"]
    assert entry.validation.status == "passed" and "mse" in entry.toolchain["quantization"]
    with inferneo_runtime.load(tiny_quantized.output, target="onnx-int4-mse") as model:
        assert model.check_goldens()


def _matmul_graph(w):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="/lm_head/MatMul")], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["B", "M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "M", n])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_affine_int4_reproduces_a_q4_1_source_exactly_where_integer_zero_points_cannot():
    """A GGUF Q4_1 tensor dequantized (w = d * q + m per block of 32, q in 0..15) comes back exactly from `affine`
    blocks, and onnxruntime's MatMulNBits plus the block-sum correction computes its product; round-to-nearest
    with integer zero points (mse's layout) re-rounds every block."""
    import numpy as np
    import onnxruntime as ort

    from inferneo_build.exporters import int4_mse, nbits

    rng = np.random.default_rng(1)
    n, k = 64, 256
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 puts the block's min and max on the grid's ends
    d = rng.uniform(0.002, 0.02, size=(n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, size=(n, k // 32, 1)).astype(np.float16).astype(np.float32)
    w = (d * q + m).reshape(n, k).astype(np.float32)  # [N, K]

    affine = nbits.affine_blocks(w, 32)
    np.testing.assert_allclose(affine.dequantized(), w, rtol=0, atol=1e-6)
    assert np.abs(int4_mse.mse_blocks(w, 32).dequantized() - w).max() > 100 * 1e-6

    model = nbits.quantize_matmuls(_matmul_graph(w.T.copy()), lambda name, weight: nbits.affine_blocks(weight, 32),
                                   32, accuracy_level=0)
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"A": a})[0], a @ w.T, rtol=1e-4, atol=1e-4)


def test_head_bits_8_reproduces_a_q8_0_head_exactly():
    """The output head in 8-bit symmetric blocks is GGUF Q8_0's layout (d * q, q in -127..127): exact."""
    import numpy as np
    import onnxruntime as ort

    from inferneo_build.exporters import nbits

    rng = np.random.default_rng(2)
    n, k = 48, 128
    q = rng.integers(-127, 128, size=(n, k // 32, 32))
    q[..., 0] = 127
    d = rng.uniform(1e-4, 1e-3, size=(n, k // 32, 1)).astype(np.float16).astype(np.float32)
    w = (d * q).reshape(n, k).astype(np.float32)
    blocks = nbits.symmetric_blocks(w, 32, 8)
    np.testing.assert_array_equal(blocks.dequantized(), w)
    model = nbits.quantize_matmuls(_matmul_graph(w.T.copy()), lambda name, weight: nbits.symmetric_blocks(weight, 32, 8),
                                   32, accuracy_level=0)
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((1, 2, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"A": a})[0], a @ w.T, rtol=1e-4, atol=1e-5)
