"""The toolchain Inferneo sees: `inferneo --version` (against the installed packages themselves), and preflight
refusing a TorchScript target written by a newer torch than this host's (the tiny artifact's manifest edited to
record other torch versions)."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import textwrap

import onnxruntime
import pytest
import torch
import transformers

import inferneo_runtime
from conftest import run_cli
from inferneo_runtime import preflight
from inferneo_runtime.manifest import MANIFEST_NAME, read_manifest
from inferneo_runtime.preflight import IncompatibleHost


def test_version_json_names_the_installed_toolchain():
    r = run_cli("--version", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["inferneo"] == importlib.metadata.version("inferneo")
    assert info["torch"] == torch.__version__ and info["transformers"] == transformers.__version__
    ort = info["onnxruntime"]
    assert ort["version"] == onnxruntime.__version__
    assert ort["providers"] == onnxruntime.get_available_providers() and "CPUExecutionProvider" in ort["providers"]
    assert importlib.metadata.version(ort["distribution"]) == onnxruntime.__version__  # the wheel actually installed
    try:
        import tensorrt
        assert info["tensorrt"] == tensorrt.__version__
    except ImportError:
        assert info["tensorrt"] is None


def test_version_text():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"inferneo {importlib.metadata.version('inferneo')} (Python ")
    text = "\n".join(lines)
    assert f"transformers       {transformers.__version__}" in text and f"torch              {torch.__version__}" in text
    assert f"onnxruntime        {onnxruntime.__version__} (" in text and "CPUExecutionProvider" in text
    r = run_cli("--json", "inspect", "x")
    assert r.returncode == 2 and "--json before a command" in r.stderr


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama"), root)
    return root


def _record_torch(root, version) -> None:
    path = root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["targets"]["torchscript"]["toolchain"]["torch"] = version
    path.write_text(json.dumps(raw, indent=2))


def test_the_build_records_its_torch(artifact):
    assert read_manifest(artifact).targets["torchscript"].toolchain["torch"] == torch.__version__


def test_torchscript_from_a_newer_torch_is_refused(artifact):
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    newer = f"{major}.{minor + 1}.0"
    _record_torch(artifact, newer)
    with pytest.raises(IncompatibleHost) as info:
        inferneo_runtime.load(artifact, target="torchscript")
    msg = str(info.value)
    assert f"written by torch {newer}" in msg and f"this host has torch {torch.__version__}" in msg
    assert f"install torch>={major}.{minor + 1}" in msg and info.value.exit_code == 5
    assert [d["check"] for d in info.value.details] == ["torch_version"]
    r = run_cli("inspect", str(artifact), "--check", "--json")
    checks = json.loads(r.stdout)
    assert r.returncode == 5 and checks["targets"]["torchscript"]["ok"] is False, r.stdout
    assert checks["targets"]["onnx"]["ok"] is True  # the ONNX target does not depend on torch


def test_torchscript_from_an_older_torch_loads(artifact):
    _record_torch(artifact, "2.6.0")
    with inferneo_runtime.load(artifact, target="torchscript") as model:
        assert model.generate("The quick brown fox", max_new_tokens=4).token_ids


def test_pt2_needs_the_same_minor(artifact):
    m = read_manifest(artifact)
    entry = m.targets["torchscript"].model_copy(update={"format": "pt2", "toolchain": {"torch": "2.6.0"}})
    other = preflight.Verdict("pt2", "pt2", "cpu")
    preflight._check_torch_version(other, entry, preflight.Host(versions={"torch": "2.13.0+cu128"}))
    assert [f.check for f in other.errors] == ["torch_version"]
    assert "compiled by torch 2.6.0; this host has torch 2.13.0+cu128" in other.errors[0].message
    same = preflight.Verdict("pt2", "pt2", "cpu")
    preflight._check_torch_version(same, entry, preflight.Host(versions={"torch": "2.6.3"}))
    assert not same.findings


def test_without_onnxruntime_the_runtime_names_both_extras(tiny_artifact):
    """A bare `pip install inferneo` has neither onnxruntime wheel: the runtime still imports, `--version` says
    so, and loading an ONNX target names the extra to install (cpu here, gpu for device cuda)."""
    script = textwrap.dedent(f"""
        import json, sys
        class Block:  # behave as if neither onnxruntime wheel were installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnxruntime":
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import inferneo_runtime
        from inferneo_runtime import toolchain
        errors = {{}}
        for device in ("cpu", "cuda"):
            try:
                inferneo_runtime.load({str(tiny_artifact("llama"))!r}, target="onnx", device=device)
            except inferneo_runtime.InferneoError as e:
                errors[device] = str(e)
        print(json.dumps({{"report": toolchain.report()["onnxruntime"], "errors": errors}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["report"] == {"distribution": None, "version": None}
    assert "pip install 'inferneo[cpu]'" in out["errors"]["cpu"]
    assert "inferneo[gpu]" in out["errors"]["cuda"]
