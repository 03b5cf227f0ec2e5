"""The build cache: an unchanged recipe rebuilds nothing; a changed tolerance, target, weight or exporter code
rebuilds; `--cache s3://…` lets a second machine (here: a second output dir and an empty local cache) skip compiling."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import run_cli, tiny_recipe_fields, write_recipe


def _build(recipe, *extra):
    r = run_cli("build", str(recipe), "--json", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_hits_and_misses(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), ckpt)
    out = tmp_path / "art"
    fields = tiny_recipe_fields(ckpt, "t", out, targets=("onnx",))
    recipe = write_recipe(tmp_path / "r.yaml", **fields)

    first = _build(recipe)
    assert first["cached"] is None
    built_at = json.loads((out / "inferneo.json").read_text())["built_at"]
    again = _build(recipe)
    assert again["cached"] == "output" and again["build_key"] == first["build_key"]
    assert json.loads((out / "inferneo.json").read_text())["built_at"] == built_at  # nothing rewritten
    assert _build(recipe, "--force")["cached"] is None

    keys = {first["build_key"]}
    fields["validation"]["logits_atol"] = 2e-3  # a tolerance changes
    keys.add(_build(write_recipe(recipe, **fields))["build_key"])
    fields["targets"].append({"format": "torchscript"})  # a target changes
    keys.add(_build(write_recipe(recipe, **fields))["build_key"])

    from safetensors.numpy import load_file, save_file
    weights = load_file(ckpt / "model.safetensors")  # a weight changes
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    result = _build(recipe)
    assert result["cached"] is None
    keys.add(result["build_key"])
    assert len(keys) == 4


def test_changed_exporter_code_rebuilds(tmp_path, tiny_checkpoint):
    # the same version string with other code (a git pull, an editable install): the artifact is not reused
    import inferneo_build
    import inferneo_runtime

    out = tmp_path / "art"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, targets=("onnx",)))
    first = _build(recipe)
    code = tmp_path / "code"
    for package in (inferneo_build, inferneo_runtime):
        src = Path(package.__file__).parent
        shutil.copytree(src, code / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    exporter = code / "inferneo_build" / "exporters" / "onnx.py"
    exporter.write_text(exporter.read_text() + "\n# an edit\n")
    # run from the copy's folder: `python -m` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "build", str(recipe), "--json"], cwd=code,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    edited = json.loads(r.stdout)
    assert edited["cached"] is None and edited["build_key"] != first["build_key"]


def test_damaged_output_is_rebuilt(tmp_path, tiny_checkpoint):
    out = tmp_path / "art"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("gpt2"), "t", out, targets=("onnx",)))
    _build(recipe)
    data = out / "onnx" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    assert _build(recipe)["cached"] is None  # a stale or damaged output is never reported as up to date


def test_shared_s3_cache(tmp_path, tiny_checkpoint, s3env, bucket):
    cache = f"s3://{bucket}/build-cache"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "a", targets=("onnx",))
    recipe = write_recipe(tmp_path / "r.yaml", **fields)
    first = _build(recipe, "--cache", cache)
    assert first["cached"] is None
    # another job: different output, its own empty local cache → pulls instead of compiling
    other = tmp_path / "b"
    result = _build(recipe, "--cache", cache, "--output", str(other))
    assert result["cached"] == f"{cache}/{first['build_key']}"
    assert (other / "onnx" / "model.onnx.data").read_bytes() == (tmp_path / "a" / "onnx" / "model.onnx.data").read_bytes()
    r = run_cli("generate", str(other), "Hello world", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr


def test_two_jobs_started_together_compile_once(tmp_path, tiny_checkpoint, s3env, bucket):
    # two CI jobs on one build key at the same moment: one takes the lock and compiles, the other waits and pulls
    cache = f"s3://{bucket}/build-cache"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "x",
                                                                     targets=("onnx",)))
    jobs = [subprocess.Popen([sys.executable, "-m", "inferneo_runtime.cli", "build", str(recipe), "--json", "--cache",
                              cache, "--output", str(tmp_path / f"job{i}")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "INFERNEO_CACHE_DIR": str(tmp_path / f"cache{i}")})
            for i in range(2)]
    results = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stdout + stderr
        results.append(json.loads(stdout))
    assert results[0]["build_key"] == results[1]["build_key"]
    assert sorted(str(r["cached"]) for r in results) == sorted(["None", f"{cache}/{results[0]['build_key']}"])
