"""GPU tests: TorchScript on CUDA against the CPU, memory figures, out-of-memory handling, preflight on a real
GPU, and (where TensorRT and Polygraphy are installed) TensorRT engines built, validated and run.

Skipped, with the reason, on hosts without a CUDA device; run them with `pytest -m gpu` on a GPU host.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import inferneo_runtime
from conftest import run_cli, tiny_recipe_fields
from inferneo_runtime.artifact import OutOfMemory
from inferneo_runtime.generation import GenerationParams
from inferneo_runtime.manifest import MANIFEST_NAME, read_manifest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda})"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _tensorrt_missing() -> str:
    for module, extra in (("tensorrt", "tensorrt"), ("polygraphy", "tensorrt")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'inferneo[{extra}]')"
    return ""


needs_tensorrt = pytest.mark.skipif(bool(_tensorrt_missing()), reason=_tensorrt_missing() or "TensorRT present")


# -- TorchScript on CUDA ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchscript_cuda_greedy_equals_cpu(smollm2_artifact):
    outputs = {}
    for device in ("cpu", "cuda"):
        with inferneo_runtime.load(smollm2_artifact, target="torchscript", device=device) as model:
            outputs[device] = [model.generate(p, max_new_tokens=32, ignore_eos=True).token_ids for p in PROMPTS]
            batched = model.generate(PROMPTS, max_new_tokens=32, ignore_eos=True)
            assert [c.token_ids for c in batched] == outputs[device], device
    assert outputs["cuda"] == outputs["cpu"]


def test_the_draw_on_cuda_is_the_host_samplers():
    """Sampled decode steps draw on the GPU (only the tokens come back): the same tokens as the numpy sampler
    at the same uniforms, as test_sampling checks for torch on the CPU."""
    from inferneo_runtime.backends.torch_sampling import draw_tokens as device_draw
    from inferneo_runtime.sampling import draw_tokens
    from test_sampling import DRAW_PARAMS, _draw_inputs

    for seed in range(4):
        logits, uniforms = _draw_inputs(seed)
        assert (device_draw(torch.from_numpy(logits).cuda(), DRAW_PARAMS, uniforms).tolist()
                == draw_tokens(logits, DRAW_PARAMS, uniforms).tolist())


def test_bench_on_the_gpu(tiny_artifact):
    """`inferneo bench --device cuda`: the torch target measured on the GPU against the device's bandwidth, with
    its peak device memory; the onnx target (CPU only) reported with the reason; peers skipped."""
    r = run_cli("bench", str(tiny_artifact("llama")), "--device", "cuda", "--runs", "2", "--compare", "transformers",
                "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["machine"]["device"] == "cuda" and "device-to-device copy" in report["machine"]["bandwidth"]["method"]
    ts = report["targets"]["torchscript"]
    assert ts["decode_tok_s"]["median"] > 0 and ts["peak_device_memory_mb"] > 0 and ts["runs_agree"]
    assert "cpu only" in report["targets"]["onnx"]["error"]
    assert "peers run on the cpu" in report["peers"]["transformers"]["skipped"]


@pytest.mark.slow
def test_cuda_memory_figures(smollm2_artifact):
    m = read_manifest(smollm2_artifact)
    torch.cuda.reset_peak_memory_stats()
    with inferneo_runtime.load(smollm2_artifact, target="torchscript", device="cuda") as model:
        first = model.memory()
        weights = sum(f.size for f in m.targets["torchscript"].files)
        assert first["device"] == "cuda" and first["weights_bytes"] == weights
        assert first["cuda_allocated_bytes"] >= 0.9 * weights  # the weights live on the GPU
        during = [model.memory() for _ in model.stream(PROMPTS[0], max_new_tokens=8)]
        dims = m.model
        per_position = dims.num_layers * 2 * dims.kv_heads * dims.head_dim * 4
        assert max(d["kv_cache_bytes"] for d in during) == per_position * 256  # one slot, one 256-position chunk
        last = model.memory()
        assert last["kv_cache_bytes"] == 0 and last["kv_cache_peak_bytes"] == per_position * 256
        assert last["cuda_max_allocated_bytes"] >= first["cuda_allocated_bytes"] + per_position * 256


@pytest.mark.slow
def test_cuda_out_of_memory_is_clear_and_recoverable(smollm2_artifact, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(smollm2_artifact, root)
    path = root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["targets"]["torchscript"]["shapes"]["max_batch"] = 10**6  # bounds that let an absurd cache be asked for
    path.write_text(json.dumps(raw))
    with inferneo_runtime.load(root, target="torchscript", device="cuda") as model:
        baseline = torch.cuda.memory_allocated()
        with pytest.raises(OutOfMemory) as info:
            model.backend.allocate_cache(10**6, 2048)
        msg = str(info.value)
        assert msg.startswith("out of memory allocating a KV cache of 1000000 sequence(s) × 2048 positions on cuda")
        assert "nothing was allocated" in msg
        assert torch.cuda.memory_allocated() == baseline and model.memory()["kv_cache_bytes"] == 0
        assert "Paris" in model.generate("The capital of France is", max_new_tokens=8).text  # still usable


def test_preflight_on_this_gpu(tiny_artifact):
    artifact = tiny_artifact("llama")
    r = run_cli("inspect", str(artifact), "--check", "--device", "cuda", "--json")
    targets = json.loads(r.stdout)["targets"]
    ts = targets["torchscript"]
    major, minor = torch.cuda.get_device_capability(0)
    assert ts["ok"], ts
    assert ts["facts"]["gpu"] == torch.cuda.get_device_name(0) and ts["facts"]["compute_capability"] == f"{major}.{minor}"
    assert not targets["onnx"]["ok"] and "the onnx backend runs on cpu only" in targets["onnx"]["errors"][0]
    assert r.returncode == 5  # the onnx target cannot load on cuda (its backend refuses it), whatever the providers
    with inferneo_runtime.load(artifact, target="torchscript", device="cuda:0") as model:
        assert model.generate("The quick brown fox", max_new_tokens=4).token_ids


# -- TensorRT ----------------------------------------------------------------------------------------------------
@needs_tensorrt
def test_tensorrt_build_validate_and_run(tiny_checkpoint, tmp_path):
    import tensorrt

    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path / "art"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, targets=("onnx",))
    fields["targets"].append({"format": "tensorrt", "precision": "fp32"})
    result = build(Recipe.model_validate(fields))
    entry = result.manifest.targets["tensorrt"]
    major, minor = torch.cuda.get_device_capability(0)
    cc = f"{major}.{minor}"
    assert entry.status == "valid" and entry.validation.status == "passed" and entry.validation.token_match
    assert entry.toolchain["tensorrt"] == tensorrt.__version__
    assert entry.compatibility["compute_capabilities"] == [cc]
    assert entry.compatibility["engines"] == [{"file": f"model.sm{major}{minor}.plan", "compute_capability": cc,
                                               "gpu": torch.cuda.get_device_name(0)}]
    assert [p["name"] for p in entry.compatibility["profiles"]] == ["decode", "prefill"]
    assert sorted(Path(f.path).name for f in entry.files) == ["model.onnx", "model.onnx.data", f"model.sm{major}{minor}.plan"]
    timing = Path(os.environ["INFERNEO_CACHE_DIR"]) / "tensorrt" / f"{tensorrt.__version__}-sm{major}{minor}" / "timing.cache"
    assert timing.is_file() and timing.stat().st_size > 0

    with inferneo_runtime.load(out, target="tensorrt", device="cuda") as model:
        model.check_goldens()  # the reference's greedy tokens, again, through the engine
        memory = model.memory()
        assert memory["weights_bytes"] == next(f.size for f in entry.files if f.path.endswith(".plan"))
        prompts = [g.prompt_ids for g in result.manifest.goldens]
        batched = model.generate_ids(prompts, GenerationParams(max_new_tokens=8))
        assert [o.token_ids for o in batched] == [g.tokens[:8] for g in result.manifest.goldens]
    r = run_cli("inspect", str(out), "--check", "--device", "cuda", "--json")
    assert json.loads(r.stdout)["targets"]["tensorrt"]["ok"], r.stdout


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_reduced_precision_engine(precision, tiny_artifact, tiny_checkpoint, tmp_path):
    """The exporter and backend directly (the build's tolerance rules belong to validate.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from inferneo_build.architectures import decoder_spec
    from inferneo_build.canonical_weights import canonical_weights
    from inferneo_build.exporters.tensorrt import export_tensorrt
    from inferneo_build.recipe import Shapes
    from inferneo_runtime.backends.tensorrt import TensorRTBackend
    from inferneo_runtime.generation import generate_ids
    from inferneo_runtime.manifest import ShapeBounds, TargetEntry, ValidationSummary, file_entry

    if precision == "bf16" and torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("bf16 engines need compute capability 8.0 or newer")
    artifact = tiny_artifact("llama")
    root = tmp_path / "art"
    shutil.copytree(artifact, root)
    manifest = read_manifest(root)
    checkpoint = tiny_checkpoint("llama")
    spec = decoder_spec(AutoConfig.from_pretrained(checkpoint))
    weights = canonical_weights(spec, AutoModelForCausalLM.from_pretrained(checkpoint).state_dict())
    shapes = Shapes(max_batch=4, max_sequence=128)
    target = types.SimpleNamespace(precision=precision, gpu_archs=[])
    exported = export_tensorrt(spec, weights, target, shapes, root / "tensorrt")
    entry = TargetEntry(format="tensorrt", status="valid", files=[file_entry(root, f) for f in exported.files],
                        dtype=exported.dtype, io=exported.io, shapes=ShapeBounds(max_batch=4, max_sequence=128),
                        toolchain=exported.toolchain, compatibility=exported.compatibility,
                        validation=ValidationSummary(status="skipped"))
    g = manifest.goldens[0]
    with TensorRTBackend(root, entry, manifest.model, device="cuda") as backend:
        assert backend.allocate_cache(1, 64).data.dtype == getattr(torch, exported.dtype)
        out = generate_ids(backend, [g.prompt_ids], GenerationParams(max_new_tokens=4), keep_logits=True)[0]
    with inferneo_runtime.load(root, target="onnx") as model:
        ref = model.generate_ids([g.prompt_ids], GenerationParams(max_new_tokens=4), keep_logits=True)[0]
    assert np.isfinite(out.prompt_logits).all()
    spread = float(ref.prompt_logits.max() - ref.prompt_logits.min())
    assert np.abs(out.prompt_logits - ref.prompt_logits).max() < 0.05 * spread
    assert out.token_ids[0] == ref.token_ids[0]
