"""Recipes that read their checkpoint from s3:// (issue #7), against a real S3-compatible server (moto over HTTP)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from conftest import run_cli, tiny_recipe_fields, write_recipe  # noqa: E402
from inferneo_build import build, build_cache  # noqa: E402
from inferneo_build import source as sources  # noqa: E402
from inferneo_build.build import toolchain_versions  # noqa: E402
from inferneo_build.recipe import Recipe  # noqa: E402
from inferneo_build.source import SourceError  # noqa: E402


def upload(client, bucket: str, prefix: str, directory: Path) -> None:
    for p in sorted(directory.iterdir()):
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}")


def s3_recipe(uri: str, out: Path, checkpoint: Path) -> Recipe:
    fields = tiny_recipe_fields(checkpoint, "tiny-s3", out, targets=("onnx",), source={"s3": uri})
    fields["validation"]["max_new_tokens"] = 8
    return Recipe.model_validate(fields)


def hf_greedy(checkpoint: Path, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def checkpoint_entries() -> dict[str, int]:
    root = Path(os.environ["INFERNEO_CACHE_DIR"]) / "checkpoints"
    return {p.name: p.stat().st_ino for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}


def test_build_from_s3_matches_local_and_downloads_once(client, bucket, tiny_checkpoint, tmp_path):
    local = tiny_checkpoint("llama")
    upload(client, bucket, "models/tiny", local)
    client.put_object(Bucket=bucket, Key="models/tiny/optimizer.pt", Body=b"never downloaded")
    client.put_object(Bucket=bucket, Key="models/tiny/checkpoint-10/model.safetensors", Body=b"nor this")
    uri = f"s3://{bucket}/models/tiny/"
    recipe = s3_recipe(uri, tmp_path / "out", local)

    built = build(recipe)
    source = built.manifest.source
    assert (source.kind, source.uri) == ("s3", uri)
    local_recipe = Recipe.model_validate({**recipe.model_dump(mode="json"), "source": {"path": str(local)}})
    assert source.weights_sha256 == sources.resolve_checkpoint(local_recipe).info.weights_sha256
    (entry,) = checkpoint_entries()
    cached = Path(os.environ["INFERNEO_CACHE_DIR"]) / "checkpoints" / entry
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in local.iterdir())

    import inferneo_runtime

    with inferneo_runtime.load(built.output) as model:
        model.check_goldens()  # the artifact reproduces its reference, and that reference is the local checkpoint's
    assert [g.tokens for g in built.manifest.goldens] == [hf_greedy(local, g.prompt_ids, len(g.tokens))
                                                          for g in built.manifest.goldens]

    # a second resolve (every build does one) lists the prefix but downloads nothing
    before = checkpoint_entries()
    logs: list[str] = []
    again = sources.resolve_checkpoint(recipe, logs.append)
    assert again.directory == cached and checkpoint_entries() == before
    assert any("downloaded before" in line for line in logs) and not any("downloading" in line for line in logs)
    assert build(recipe).cached == "output"

    # new weights under the same URI: another cache entry and another build key
    key = build_cache.build_key(recipe, again, toolchain_versions())
    other = tiny_checkpoint("qwen2")
    client.upload_file(str(other / "model.safetensors"), bucket, "models/tiny/model.safetensors")
    changed = sources.resolve_checkpoint(recipe)
    assert changed.directory != cached and changed.info.weights_sha256 != source.weights_sha256
    assert build_cache.build_key(recipe, changed, toolchain_versions()) != key
    assert not list(cached.parent.glob(".*partial*"))  # no temporary download left behind


def test_missing_prefix_is_exit_2_naming_the_uri(bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{bucket}/no/such/checkpoint/"
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-s3", out, targets=("onnx",), source={"s3": uri})
    r = run_cli("build", str(write_recipe(tmp_path / "r.yaml", **fields)), "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    message = json.loads(r.stdout)["message"]
    assert uri in message and "no objects" in message
    assert not out.exists()


def test_s3_source_errors_name_the_uri(client, bucket, tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")

    def fails(uri: str, *needles: str) -> None:
        with pytest.raises(SourceError) as e:
            sources.resolve_checkpoint(s3_recipe(uri, tmp_path / "out", ckpt))
        assert e.value.exit_code == 2 and uri in str(e.value)
        for needle in needles:
            assert needle in str(e.value), str(e.value)

    fails("s3://inferneo-no-such-bucket-xyz/models/tiny", "does not exist")
    client.put_object(Bucket=bucket, Key="weights-only/model.safetensors", Body=b"x")
    fails(f"s3://{bucket}/weights-only", "no config.json")
    client.put_object(Bucket=bucket, Key="pickled/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="pickled/pytorch_model.bin", Body=b"x")
    fails(f"s3://{bucket}/pickled", "pytorch_model.bin", "allow_pickle: true")
    assert not checkpoint_entries()  # nothing refused was downloaded


def test_access_denied_names_the_uri(tiny_checkpoint, tmp_path, monkeypatch):
    # moto enforcing IAM: after the setup calls below, requests need a real identity, and a user with no
    # policy is refused (403 AccessDenied) by the server itself
    import boto3

    from conftest import moto_server

    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="3") as url:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("INFERNEO_CACHE_DIR", str(tmp_path / "cache"))
        setup = dict(aws_access_key_id="testing", aws_secret_access_key="testing")
        boto3.client("s3", **setup).create_bucket(Bucket="private-bucket")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="reader-without-policy")
        key = iam.create_access_key(UserName="reader-without-policy")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        uri = "s3://private-bucket/models/tiny"
        with pytest.raises(SourceError, match=f"{uri}.*access denied") as e:
            sources.resolve_checkpoint(s3_recipe(uri, tmp_path / "out", tiny_checkpoint("llama")))
        assert e.value.exit_code == 2


def test_recipe_checks_the_s3_uri(tiny_checkpoint, tmp_path):
    from inferneo_build.recipe import RecipeError, load_recipe

    for bad in ("bucket/models/tiny", "s3:///models/tiny"):
        fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "out", source={"s3": bad})
        with pytest.raises(RecipeError, match=f"source.s3: .*{bad}.*s3://bucket/prefix"):
            load_recipe(write_recipe(tmp_path / "r.yaml", **fields))
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", tmp_path / "out",
                                source={"s3": "s3://b/m", "path": str(tiny_checkpoint("llama"))})
    with pytest.raises(RecipeError, match="exactly one of hf, path, gguf or s3 \\(got path, s3\\)"):
        load_recipe(write_recipe(tmp_path / "r.yaml", **fields))
