"""A flipped byte in any artifact file is caught on load and by `inferneo validate`, naming the file."""
from __future__ import annotations

import shutil

import pytest

import inferneo_runtime
from conftest import run_cli


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["onnx/model.onnx.data", "tokenizer.json", "torchscript/model.pt"])
def test_flipped_byte_is_named(rel, tiny_artifact, tmp_path):
    artifact = tmp_path / "copy"
    shutil.copytree(tiny_artifact("llama"), artifact)
    _flip(artifact / rel)
    target = "torchscript" if rel.startswith("torchscript") else "onnx"
    with pytest.raises(inferneo_runtime.IntegrityError, match=rel.replace(".", r"\.")):
        inferneo_runtime.load(artifact, target=target)
    r = run_cli("validate", str(artifact))
    assert r.returncode == 4, r.stdout + r.stderr
    assert rel in r.stderr


def test_missing_file_and_bad_manifest(tiny_artifact, tmp_path):
    artifact = tmp_path / "copy"
    shutil.copytree(tiny_artifact("llama"), artifact)
    (artifact / "onnx" / "model.onnx").unlink()
    with pytest.raises(inferneo_runtime.IntegrityError, match="model.onnx.*missing"):
        inferneo_runtime.load(artifact, target="onnx")
    (artifact / "inferneo.json").write_text('{"schema_version": 99}')
    with pytest.raises(inferneo_runtime.ManifestError, match="schema_version 99"):
        inferneo_runtime.load(artifact)
    r = run_cli("inspect", str(tmp_path / "nowhere"))
    assert r.returncode == 3 and "no manifest" in r.stderr


def test_validate_bad_arguments_are_input_errors(tiny_artifact):
    """An unknown --target exited 1 (a bare ValueError); a --device no target can run on passed with exit 0 and
    "targets: none", having checked no goldens at all."""
    import json

    art = str(tiny_artifact("llama"))
    r = run_cli("validate", art, "--target", "nope", "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "has no target 'nope'" in json.loads(r.stdout)["message"]
    r = run_cli("validate", art, "--device", "tpu", "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    payload = json.loads(r.stdout)
    assert payload["ok"] is False and "--device" in payload["message"] and "'tpu'" in payload["message"]
