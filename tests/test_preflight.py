"""Preflight: manifests the builder wrote (the tiny artifact, copied and edited to declare other TensorRT
versions, compute capabilities, devices) checked against hosts described in the test, and against this host.
Nothing here loads an engine: preflight decides from the manifest alone."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import inferneo_runtime
from conftest import run_cli
from inferneo_build.exporters.tensorrt import io_signature
from inferneo_runtime import preflight
from inferneo_runtime.artifact import OutOfMemory
from inferneo_runtime.errors import IntegrityError, MissingExtraError
from inferneo_runtime.manifest import MANIFEST_NAME, read_manifest
from inferneo_runtime.preflight import GPU, Host, IncompatibleHost

GB = 10**9
L4 = GPU(0, "NVIDIA L4", "8.9", total_bytes=24 * GB, free_bytes=20 * GB)
H100 = GPU(0, "NVIDIA H100 80GB HBM3", "9.0", total_bytes=80 * GB, free_bytes=70 * GB)
TRT = "10.9.0.34"


def _host(**facts) -> Host:
    """A host with everything the tensorrt target needs unless the test says otherwise."""
    versions = {"tensorrt": TRT, "torch": "2.13.0", "onnxruntime": "1.32.0"} | facts.pop("versions", {})
    facts.setdefault("torch_cuda", True)
    facts.setdefault("gpus", [L4])
    facts.setdefault("available_memory", 16 * GB)
    return Host(versions=versions, **facts)


def _edit(root, fn) -> None:
    path = root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw, indent=2))


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    """A copy of the builder's tiny llama artifact plus a `tensorrt` target declaring engines for 8.0 and 8.9
    built with TensorRT 10.9 (the engine files are placeholders: preflight never reads them)."""
    root = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama"), root)
    m = read_manifest(root)
    (root / "tensorrt").mkdir()
    files = []
    for arch, size in (("80", 3000), ("89", 2000)):
        (root / "tensorrt" / f"model.sm{arch}.plan").write_bytes(b"\0" * size)
        files.append({"path": f"tensorrt/model.sm{arch}.plan", "sha256": "0" * 64, "size": size})
    spec = type("Spec", (), {"num_layers": m.model.num_layers, "kv_heads": m.model.kv_heads,
                             "head_dim": m.model.head_dim, "vocab": m.model.vocab})
    entry = {
        "format": "tensorrt", "status": "valid", "files": files, "dtype": "float16",
        "io": io_signature(spec, "fp16").model_dump(mode="json"),
        "shapes": m.targets["onnx"].shapes.model_dump(), "toolchain": {"tensorrt": TRT, "torch": "2.13.0"},
        "compatibility": {"tensorrt": TRT, "precision": "fp16", "compute_capabilities": ["8.0", "8.9"],
                          "engines": [{"file": "model.sm80.plan", "compute_capability": "8.0",
                                       "gpu": "NVIDIA A100-SXM4-80GB"},
                                      {"file": "model.sm89.plan", "compute_capability": "8.9", "gpu": "NVIDIA L4"}]},
        "validation": {"status": "passed"},
    }
    _edit(root, lambda raw: raw["targets"].update(tensorrt=entry))
    return root


def test_matching_host_passes(artifact):
    m = read_manifest(artifact)
    v = preflight.check(m, "tensorrt", "cuda", _host())
    assert v.ok and v.status == "ok" and not v.findings, v.findings
    assert v.facts["compute_capability"] == "8.9" and v.facts["engine_tensorrt"] == TRT
    assert v.facts["weights_bytes"] == 2000  # the sm89 engine only; not the sm80 one
    v.raise_for_errors()


def test_other_tensorrt_version(artifact):
    m = read_manifest(artifact)
    v = preflight.check(m, "tensorrt", "cuda", _host(versions={"tensorrt": "10.12.0.36"}))
    assert [f.check for f in v.errors] == ["tensorrt_version"]
    with pytest.raises(IncompatibleHost) as info:
        v.raise_for_errors()
    msg = str(info.value)
    assert "built with TensorRT 10.9.0.34" in msg and "this host has TensorRT 10.12.0.36" in msg
    assert "tensorrt==10.9.0.34" in msg and info.value.exit_code == 5


def test_other_compute_capability(artifact):
    m = read_manifest(artifact)
    v = preflight.check(m, "tensorrt", "cuda", _host(gpus=[H100]))
    assert [f.check for f in v.errors] == ["compute_capability"]
    msg = v.errors[0].message
    assert "8.0 (NVIDIA A100-SXM4-80GB), 8.9 (NVIDIA L4)" in msg
    assert "cuda:0 is NVIDIA H100 80GB HBM3 with compute capability 9.0" in msg and 'gpu_archs including "9.0"' in msg


def test_several_mismatches_are_each_one_line(artifact):
    m = read_manifest(artifact)
    v = preflight.check(m, "tensorrt", "cuda", _host(versions={"tensorrt": "11.4.0.106"}, gpus=[H100]))
    with pytest.raises(IncompatibleHost) as info:
        v.raise_for_errors()
    lines = str(info.value).splitlines()
    assert lines[0] == "target 'tensorrt' (tensorrt) cannot run on cuda here:"
    assert len(lines) == 3 and "TensorRT 11.4.0.106" in lines[1] and "compute capability 9.0" in lines[2]
    assert [d["check"] for d in info.value.details] == ["tensorrt_version", "compute_capability"]


def test_missing_extras(artifact):
    m = read_manifest(artifact)
    v = preflight.check(m, "tensorrt", "cuda", _host(versions={"tensorrt": None}))
    with pytest.raises(MissingExtraError, match=r"TensorRT engines needs the 'tensorrt' package: pip install "
                                                r"'inferneo\[tensorrt\]'"):
        v.raise_for_errors()
    v = preflight.check(m, "torchscript", "cpu", _host(versions={"torch": None}))
    with pytest.raises(MissingExtraError, match=r"inferneo\[torchscript\]"):
        v.raise_for_errors()


def test_onnx_on_cuda_is_refused_with_the_reason(artifact):
    """The onnx backend refuses CUDA (test_onnx_backend.py::test_cuda_is_refused_clearly), so preflight does too,
    even where onnxruntime has the CUDA provider, and says why."""
    m = read_manifest(artifact)
    for providers in (["AzureExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        v = preflight.check(m, "onnx", "cuda", _host(onnx_providers=providers))
        assert [f.check for f in v.errors] == ["device"], v.findings
        msg = v.errors[0].message
        assert "the onnx backend runs on cpu only" in msg and ", ".join(providers) in msg and "KV cache" in msg
    assert preflight.check(m, "onnx", "cpu", _host(onnx_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])).ok


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:1"])
def test_preflight_ok_means_load_succeeds(tiny_artifact, monkeypatch, device):
    """For every target and device: preflight's "ok" (what `inspect --check` prints) means `load` succeeds, and
    a refusal is preflight's. The host reports onnxruntime's CUDA provider (as onnxruntime-gpu would) and a GPU
    (this host's, or an L4 where it has none); every other fact (torch's CUDA, versions, memory) is this host's
    own. `load` runs its own preflight, so it is given the same host."""
    artifact = tiny_artifact("llama")
    m = read_manifest(artifact)
    host = Host(onnx_providers=["CUDAExecutionProvider", "CPUExecutionProvider"], gpus=Host().gpus() or [L4])
    monkeypatch.setattr(preflight, "Host", lambda: host)
    for target in m.targets:
        verdict = preflight.check(m, target, device, host)
        if verdict.ok:
            with inferneo_runtime.load(artifact, target=target, device=device) as model:
                assert len(model.generate("The quick brown fox", max_new_tokens=2).token_ids) == 2
        else:
            with pytest.raises((IncompatibleHost, MissingExtraError)):
                inferneo_runtime.load(artifact, target=target, device=device)


def test_devices(artifact):
    m = read_manifest(artifact)
    v = preflight.check(m, "tensorrt", "cpu", _host())
    assert [f.check for f in v.errors] == ["device"] and "CUDA GPUs only" in v.errors[0].message
    v = preflight.check(m, "tensorrt", "cuda:1", _host())
    assert "cuda:1" in v.errors[0].message and "1 CUDA device(s): cuda:0 NVIDIA L4 (compute capability 8.9)" in v.errors[0].message
    v = preflight.check(m, "torchscript", "cuda", _host(torch_cuda=False, torch_cuda_reason="torch 2.13.0+cpu is a "
                                                                                        "CPU-only build"))
    assert v.errors[0].message == ("device 'cuda' requested but torch 2.13.0+cpu is a CPU-only build; this host "
                                   "cannot run torchscript on CUDA")
    v = preflight.check(m, "onnx", "tpu", _host())
    assert v.errors[0].message == "device 'tpu' is not one of cpu, cuda, cuda:N"


def test_memory(artifact):
    m = read_manifest(artifact)
    weights = sum(f.size for f in m.targets["onnx"].files)
    per_position = m.model.num_layers * 2 * m.model.kv_heads * m.model.head_dim * 4
    smallest = per_position * min(256, m.targets["onnx"].shapes.max_sequence)
    v = preflight.check(m, "onnx", "cpu", _host(available_memory=weights + smallest - 1))
    assert [f.check for f in v.errors] == ["memory"]
    assert "host RAM has" in v.errors[0].message and "weights" in v.errors[0].message
    v = preflight.check(m, "onnx", "cpu", _host(available_memory=weights + smallest))
    assert v.ok and [f.check for f in v.warnings] == ["memory"] and "full KV cache of 4 × 128" in v.warnings[0].message
    tight = GPU(0, "NVIDIA L4", "8.9", free_bytes=1000)
    v = preflight.check(m, "tensorrt", "cuda", _host(gpus=[tight]))
    assert "cuda:0 (NVIDIA L4) has 0.00 GB free" in v.errors[0].message
    half = m.model.num_layers * 2 * m.model.kv_heads * m.model.head_dim * 2  # the fp16 engine's cache
    assert v.facts["kv_cache_min_bytes"] == half * 128


def test_skipped_target(artifact):
    _edit(artifact, lambda raw: raw["targets"]["tensorrt"].update(
        status="skipped", files=[], validation={"status": "skipped", "reason": "TensorRT is not installed"}))
    v = preflight.check(read_manifest(artifact), "tensorrt", "cuda", _host())
    assert v.status == "skipped" and v.skipped == "TensorRT is not installed" and not v.ok


# -- this host ---------------------------------------------------------------------------------------------
def test_load_checks_before_reading_files(artifact):
    """A device this host lacks fails on the manifest alone: a corrupted model file is never even hashed."""
    (artifact / "torchscript" / "model.pt").write_bytes(b"corrupt")
    if not torch.cuda.is_available():
        with pytest.raises(IncompatibleHost, match="device 'cuda' requested but torch .*(CPU-only build|sees no CUDA)"):
            inferneo_runtime.load(artifact, target="torchscript", device="cuda")
    with pytest.raises(IntegrityError):  # on a device it has, the checksum is what fails
        inferneo_runtime.load(artifact, target="torchscript", device="cpu")


def test_load_tensorrt_here(artifact):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    if torch.cuda.is_available():
        with pytest.raises(MissingExtraError, match=r"inferneo\[tensorrt\]"):
            inferneo_runtime.load(artifact, target="tensorrt", device="cuda")
    else:  # every problem at once, one line each
        with pytest.raises(IncompatibleHost, match=r"(?s)inferneo\[tensorrt\].*device 'cuda' requested but torch"):
            inferneo_runtime.load(artifact, target="tensorrt", device="cuda")


def test_inspect_check_cli(artifact, tiny_artifact):
    r = run_cli("inspect", str(tiny_artifact("llama")), "--check", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    payload = json.loads(r.stdout)
    assert payload["ok"] and {n: t["status"] for n, t in payload["targets"].items()} == {"onnx": "ok", "torchscript": "ok"}

    r = run_cli("inspect", str(artifact), "--check", "--json")
    assert r.returncode == 5, r.stdout + r.stderr
    targets = json.loads(r.stdout)["targets"]
    assert targets["onnx"]["ok"] and targets["torchscript"]["ok"]
    assert targets["tensorrt"]["status"] == "incompatible"
    assert any("CUDA GPUs only" in e for e in targets["tensorrt"]["errors"])

    if not torch.cuda.is_available():
        r = run_cli("inspect", str(artifact), "--check", "--device", "cuda")
        assert r.returncode == 5
        assert "✗ torchscript (torchscript) on cuda: incompatible" in r.stdout
        assert "device 'cuda' requested but torch" in r.stdout and "the onnx backend runs on cpu only" in r.stdout



def test_validate_runs_preflight_per_target(artifact):
    """`inferneo validate` checks each target's preflight before reading its files: the tensorrt target (whose
    placeholder engines would fail their checksums) is reported unavailable here and the others still pass."""
    r = run_cli("validate", str(artifact), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    targets = json.loads(r.stdout)["targets"]
    assert targets["onnx"]["status"] == targets["torchscript"]["status"] == "passed"
    assert targets["tensorrt"]["status"] == "unavailable" and "CUDA GPUs only" in targets["tensorrt"]["reason"]

    r = run_cli("validate", str(artifact), "--target", "tensorrt", "--json")  # asked for by name: a failure
    assert r.returncode == 5, r.stdout + r.stderr
    assert not json.loads(r.stdout)["ok"]

# -- memory accounting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnx", "torchscript"])
def test_memory_report(tiny_artifact, target):
    artifact = tiny_artifact("llama")
    m = read_manifest(artifact)
    with inferneo_runtime.load(artifact, target=target) as model:
        before = model.memory()
        assert before["weights_bytes"] == sum(f.size for f in m.targets[target].files) > 0
        assert before["kv_cache_bytes"] == 0 and before["peak_rss_bytes"] > 0
        seen = []
        for _ in model.stream("The quick brown fox", max_new_tokens=4):
            seen.append(model.memory()["kv_cache_bytes"])
        per_position = m.model.num_layers * 2 * m.model.kv_heads * m.model.head_dim * 4
        assert max(seen) == per_position * 128  # one sequence, capacity rounded up to the bounds (128)
        after = model.memory()
        assert after["kv_cache_bytes"] == 0 and after["kv_cache_peak_bytes"] == max(seen)  # freed once idle


@pytest.mark.parametrize("target", ["onnx", "torchscript"])
def test_absurd_cache_is_a_clear_error(tiny_artifact, tmp_path, target):
    root = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama"), root)
    # the largest bounds a manifest may declare: 2^16 sequences × 2^24 positions is ~5 × 10^14 bytes here
    _edit(root, lambda raw: raw["targets"][target]["shapes"].update(max_batch=2**16, max_sequence=2**24))
    with inferneo_runtime.load(root, target=target) as model:
        with pytest.raises(OutOfMemory) as info:
            model.backend.allocate_cache(2**16, 2**24)
        msg = str(info.value)
        assert msg.startswith(f"out of memory allocating a KV cache of {2**16} sequence(s) × {2**24} positions on cpu")
        assert "2 layers × 2 (key, value) × 2 KV heads × 16 dims × 4 bytes" in msg and "nothing was allocated" in msg
        assert model.memory()["kv_cache_bytes"] == 0
        assert len(model.generate("The quick brown fox", max_new_tokens=4).token_ids) == 4  # still usable


def test_bare_engine_is_checked_as_far_as_it_can_be(artifact):
    """A bare model.plan being served records neither TensorRT version nor compute capability: warnings, not errors."""
    _edit(artifact, lambda raw: raw["targets"]["tensorrt"].update(
        toolchain={}, compatibility={}, io=None, files=raw["targets"]["tensorrt"]["files"][1:]))
    v = preflight.check(read_manifest(artifact), "tensorrt", "cuda", _host())
    assert v.ok and [f.check for f in v.warnings] == ["tensorrt_version", "compute_capability"]
    assert "loads only if TensorRT 10.9.0.34 built it" in v.warnings[0].message
    assert v.facts["weights_bytes"] == 2000
