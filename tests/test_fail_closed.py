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
from inferneo_runtime.manifest import read_manifest


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


def test_a_mixed_step_that_differs_from_its_two_forwards_fails_the_build(tmp_path, tiny_checkpoint, monkeypatch):
    """The mixed-step graph (a prompt chunk in the decode step's forward) is validated like the target itself:
    here its chunk attends with the wrong scale, so the chunk's logits are not those of its own forward."""
    import onnx

    import inferneo_build.exporters.onnx as onnx_exporter
    from inferneo_build.exporters.onnx_mixed import write_mixed_graph

    def miswritten(model_path):
        path = write_mixed_graph(model_path)
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:
            if node.name.endswith("/chunk/GroupQueryAttention"):
                scale = next(a for a in node.attribute if a.name == "scale")
                scale.f *= 1.5
        onnx.save_model(model, str(path))
        return path

    monkeypatch.setattr(onnx_exporter, "write_mixed_graph", miswritten)
    out = tmp_path / "art"
    recipe = Recipe.model_validate(tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, targets=("onnx",)))
    with pytest.raises(ValidationFailed, match="mixed decode \\+ prefill step differs from its two forwards") as info:
        build(recipe)
    assert info.value.reports[0].mixed_step_error > 1e-3 and not out.exists()
    monkeypatch.undo()
    artifact = build(recipe).output  # written correctly, the same build passes and records the figure
    validation = read_manifest(artifact).targets["onnx"].validation
    assert validation.status == "passed" and validation.mixed_step_max_abs_error <= 1e-4


def test_validate_on_the_deploy_host_rechecks_the_mixed_step(tiny_artifact, tmp_path):
    """`inferneo validate` runs the mixed step against its two forwards again: a mixed-step graph that computes
    otherwise on this host (here: rewritten, its checksum updated to match) fails the target."""
    import hashlib
    import shutil

    import onnx

    from inferneo_runtime.backends.onnx import MIXED_GRAPH
    from inferneo_runtime.validate import validate_artifact

    artifact = shutil.copytree(tiny_artifact("llama"), tmp_path / "art")
    assert validate_artifact(artifact, "onnx", show_progress=False).targets["onnx"]["status"] == "passed"
    path = artifact / "onnx" / MIXED_GRAPH
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.name.endswith("/chunk/GroupQueryAttention"):
            next(a for a in node.attribute if a.name == "scale").f *= 1.5
    onnx.save_model(model, str(path))
    manifest = json.loads((artifact / "inferneo.json").read_text())
    for f in manifest["targets"]["onnx"]["files"]:
        if f["path"].endswith(MIXED_GRAPH):
            f["sha256"], f["size"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (artifact / "inferneo.json").write_text(json.dumps(manifest))
    result = validate_artifact(artifact, "onnx", show_progress=False).targets["onnx"]
    assert result["status"] == "failed" and "mixed decode + prefill step differs" in result["reason"]
