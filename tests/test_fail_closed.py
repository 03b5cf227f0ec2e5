"""Validation fails closed: a broken export publishes nothing, and an existing artifact stays intact."""
from __future__ import annotations

import json

import numpy as np
import pytest

import inferneo_build.exporters as exporters
import inferneo_runtime
from conftest import run_cli, tiny_recipe_fields, write_recipe
from inferneo_build import ValidationFailed, build
from inferneo_build.recipe import Recipe
from inferneo_runtime.artifact import TargetNotAvailable


def _perturbing(real_factory):
    real = real_factory()

    def export(spec, weights, target, shapes, out_dir):
        result = real(spec, weights, target, shapes, out_dir)
        data = next(p for p in result.files if p.name.endswith(".data"))
        raw = np.fromfile(data, dtype=np.float32)
        raw[::7] += 0.05  # perturbed weights in the exported file (every 7th value: padding alone is never hit)
        raw.tofile(data)
        return result

    return lambda: export


def test_perturbed_export_fails_and_publishes_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "art"
    recipe = Recipe.model_validate(tiny_recipe_fields(tiny_checkpoint("llama"), "t", out))
    build(recipe)  # a good artifact exists first
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    monkeypatch.setitem(exporters._EXPORTERS, "onnx", _perturbing(exporters._EXPORTERS["onnx"]))
    with pytest.raises(ValidationFailed) as info:
        build(recipe, force=True)  # force: the build cache would otherwise find the output up to date
    report = {r.target: r for r in info.value.reports}
    assert not report["onnx"].passed and report["onnx"].max_abs_logits_error > 1e-3
    assert report["torchscript"].passed
    assert "onnx" in str(info.value) and "nothing was published" in str(info.value)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous artifact is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging left behind


def test_cli_exits_nonzero_with_numbers(tmp_path, tiny_checkpoint):
    out = tmp_path / "art"
    fields = tiny_recipe_fields(tiny_checkpoint("gpt2"), "t", out, targets=("onnx",))
    fields["validation"]["logits_atol"] = 1e-12  # no fp32 export matches a different kernel to this
    r = run_cli("build", str(write_recipe(tmp_path / "r.yaml", **fields)), "--json")
    assert r.returncode == 7, r.stdout + r.stderr
    payload = json.loads(r.stdout)
    assert payload["error"] == "ValidationFailed"
    detail = payload["details"][0]
    assert detail["target"] == "onnx" and detail["max_abs_logits_error"] > 1e-12
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]


def test_unavailable_tensorrt_target(tmp_path, tiny_checkpoint):
    """Without TensorRT a required tensorrt target fails clearly; `optional: true` records a skip."""
    out = tmp_path / "art"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, targets=("onnx",))
    fields["targets"].append({"format": "tensorrt", "gpu_archs": ["8.0", "9.0"]})
    r = run_cli("build", str(write_recipe(tmp_path / "r.yaml", **fields)))
    assert r.returncode == 5 and "TensorRT" in r.stderr and not out.exists()

    fields["targets"][-1]["optional"] = True
    recipe = Recipe.model_validate(fields)
    m = build(recipe).manifest
    assert m.targets["tensorrt"].status == "skipped" and "TensorRT" in m.targets["tensorrt"].validation.reason
    assert m.targets["onnx"].status == "valid"
    assert not (out / "tensorrt").exists()  # a skip writes no engine, fake or partial
    with pytest.raises(TargetNotAvailable, match="'tensorrt' of 't' was skipped at build time: TensorRT"):
        inferneo_runtime.load(out, target="tensorrt")
    r = run_cli("inspect", str(out), "--check", "--json")  # a recorded skip is not this host's problem
    assert r.returncode == 0, r.stdout + r.stderr
    checked = json.loads(r.stdout)["targets"]
    assert checked["tensorrt"]["status"] == "skipped" and "TensorRT" in checked["tensorrt"]["skipped_reason"]
    assert checked["onnx"]["status"] == "ok"
