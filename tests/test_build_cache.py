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
    out = tmp_path / "art"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, targets=("onnx",)))
    first = _build(recipe)

    def edit(code: Path) -> None:
        exporter = code / "inferneo_build" / "exporters" / "onnx.py"
        exporter.write_text(exporter.read_text() + "\n# an edit\n")

    edited = _build_with_edited_code(recipe, tmp_path / "code", edit)
    assert edited["cached"] is None and edited["build_key"] != first["build_key"]


def _build_with_edited_code(recipe: Path, code: Path, edit) -> dict:
    """Build `recipe` (--json) with a copy of inferneo_build and inferneo_runtime under `code` that `edit` changed."""
    import inferneo_build
    import inferneo_runtime

    for package in (inferneo_build, inferneo_runtime):
        src = Path(package.__file__).parent
        shutil.copytree(src, code / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    edit(code)
    # run from the copy's folder: `python -m` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "build", str(recipe), "--json"], cwd=code,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


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


def test_damaged_s3_cache_entry_is_rebuilt(tmp_path, tiny_checkpoint, s3env, bucket, client):
    # an object of the cached artifact damaged in S3 (a bad re-upload, bit rot): the cache entry is not served,
    # and not fatal either: the build compiles as on a miss
    cache = f"s3://{bucket}/build-cache"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "a",
                                                                     targets=("onnx",)))
    first = _build(recipe, "--cache", cache)
    version = json.loads(client.get_object(Bucket=bucket, Key=f"build-cache/{first['build_key']}/LATEST")
                         ["Body"].read())["version"]
    key = f"build-cache/{first['build_key']}/versions/{version}/onnx/model.onnx.data"
    raw = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw[100] ^= 1
    client.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    other = tmp_path / "b"
    r = run_cli("build", str(recipe), "--json", "--cache", cache, "--output", str(other),
                env={"INFERNEO_CACHE_DIR": str(tmp_path / "other-cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["cached"] is None
    assert run_cli("validate", str(other)).returncode == 0


def test_damaged_local_copy_of_a_cache_entry_is_not_fatal(tmp_path, tiny_checkpoint, s3env, bucket):
    # the local copy of a pulled cache entry damaged on disk (same size, other bytes): fetched again, not fatal
    cache = f"s3://{bucket}/build-cache"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "a",
                                                                     targets=("onnx",)))
    first = _build(recipe, "--cache", cache)
    assert _build(recipe, "--cache", cache, "--output", str(tmp_path / "b"))["cached"]
    (data,) = (Path(os.environ["INFERNEO_CACHE_DIR"]) / "artifacts").rglob("model.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.chmod(0o644)
    data.write_bytes(bytes(raw))
    result = _build(recipe, "--cache", cache, "--output", str(tmp_path / "c"))
    assert result["cached"] == f"{cache}/{first['build_key']}"  # pulled again from S3
    assert run_cli("validate", str(tmp_path / "c")).returncode == 0


def test_changed_sentence_transformers_pooling_rebuilds(tmp_path):
    # the same weights with another pooling (1_Pooling/config.json) make another artifact: not the cached one
    from test_encoders import encoder_recipe, make_tiny_bert

    from inferneo_build import build

    ckpt = make_tiny_bert(tmp_path / "ckpt", pooling="mean")
    recipe = encoder_recipe({"path": str(ckpt)}, tmp_path / "art", targets=[{"format": "onnx"}])
    first = build(recipe)
    pooling = ckpt / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    again = build(recipe)
    assert again.cached is None and again.manifest.build_key != first.manifest.build_key
    assert json.loads((tmp_path / "art" / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"]
    assert build(recipe).cached == "output"  # and unchanged, it is reused


def test_changed_legacy_sentence_transformers_config_rebuilds(tmp_path):
    # sentence-transformers reads its Transformer settings from sentence_<model>_config.json under older names too:
    # a changed max_seq_length there is another artifact
    from test_encoders import encoder_recipe, make_tiny_bert

    from inferneo_build import build

    ckpt = make_tiny_bert(tmp_path / "ckpt", pooling="mean")
    legacy = ckpt / "sentence_distilbert_config.json"
    (ckpt / "sentence_bert_config.json").rename(legacy)
    recipe = encoder_recipe({"path": str(ckpt)}, tmp_path / "art", targets=[{"format": "onnx"}])
    assert build(recipe).manifest.encoder.max_length == 48
    legacy.write_text(json.dumps({**json.loads(legacy.read_text()), "max_seq_length": 24}))
    again = build(recipe)
    assert again.cached is None and again.manifest.encoder.max_length == 24


def test_changed_evaluation_text_rebuilds(tmp_path, tiny_checkpoint):
    # reduced precisions are judged on the evaluation text: other text is another validation, not the cached one
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "art", targets=())
    fields["targets"] = [{"format": "onnx", "precision": "int8",
                          "tolerance": {"top1_agreement": 0.0, "mean_kl": 100.0, "perplexity_delta": 100.0}}]
    fields["validation"]["evaluation_files"] = [str(text)]
    recipe = write_recipe(tmp_path / "r.yaml", **fields)
    first = _build(recipe)
    text.write_text("Hello world, this is another text entirely, about foxes and dogs. " * 8)
    again = _build(recipe)
    assert again["cached"] is None and again["build_key"] != first["build_key"]
    assert _build(recipe)["cached"] == "output"


def test_changed_shipped_evaluation_text_rebuilds(tmp_path, tiny_checkpoint):
    # the shipped evaluation text (inferneo_build/eval_text/) judges reduced precisions as the code does
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "art", targets=())
    fields["targets"] = [{"format": "onnx", "precision": "int8",
                          "tolerance": {"top1_agreement": 0.0, "mean_kl": 100.0, "perplexity_delta": 100.0}}]
    recipe = write_recipe(tmp_path / "r.yaml", **fields)
    first = _build(recipe)

    def edit(code: Path) -> None:
        prose = code / "inferneo_build" / "eval_text" / "prose.txt"
        prose.write_text(prose.read_text()[: len(prose.read_text()) // 2])

    edited = _build_with_edited_code(recipe, tmp_path / "code", edit)
    assert edited["cached"] is None and edited["build_key"] != first["build_key"]
