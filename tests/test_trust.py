"""Signed manifests, path safety, and fuzzed recipe/manifest readers."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inferneo_runtime
from conftest import run_cli
from inferneo_runtime.errors import ManifestError
from inferneo_runtime.signing import SignatureError


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("ci", "other"):
        r = run_cli("keygen", str(d / name), "--json")
        assert r.returncode == 0, r.stderr
        made[name] = json.loads(r.stdout)
    assert oct(os.stat(d / "ci").st_mode & 0o777) == "0o600"
    return made


@pytest.fixture
def signed(tiny_artifact, tmp_path, keys):
    art = tmp_path / "signed"
    shutil.copytree(tiny_artifact("llama"), art)
    from inferneo_runtime.signing import sign_artifact

    assert sign_artifact(art, keys["ci"]["private_key"]) == keys["ci"]["key_id"]
    return art


def test_keygen_refuses_an_existing_key_pair_with_exit_2(keys, tmp_path):
    # an existing key (or public key) is bad input, exit 2 (README's exit codes), and is left as it was
    private = keys["ci"]["private_key"]
    before = open(private, "rb").read()
    r = run_cli("keygen", private, "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert json.loads(r.stdout)["error"] == "KeyExistsError"
    assert open(private, "rb").read() == before
    (tmp_path / "lone.pub").write_text("someone's public key")
    r = run_cli("keygen", str(tmp_path / "lone"))
    assert r.returncode == 2 and "lone.pub already exists" in r.stderr, r.stderr
    assert not (tmp_path / "lone").exists() and (tmp_path / "lone.pub").read_text() == "someone's public key"


def test_signed_artifact_loads_with_its_key(signed, keys):
    pub = keys["ci"]["public_key"]
    with inferneo_runtime.load(signed, trusted_keys=[pub]) as m:
        assert m.generate("Hello", max_new_tokens=3).token_ids
    r = run_cli("validate", str(signed), "--json", env={"INFERNEO_TRUSTED_KEYS": pub})
    assert r.returncode == 0 and json.loads(r.stdout)["signed_by"] == keys["ci"]["key_id"]


def test_required_signatures_load_the_signed_files_not_the_hosts_packed_copy(signed, keys, tmp_path, monkeypatch):
    monkeypatch.setenv("INFERNEO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("INFERNEO_ONNX_CACHE", "1")  # asked for, and still not used for a signed load
    with inferneo_runtime.load(signed, target="onnx", trusted_keys=[keys["ci"]["public_key"]]) as m:
        assert m.backend.session_source == "artifact"
    assert not (tmp_path / "cache" / "onnx-prepacked").exists()
    with inferneo_runtime.load(signed, target="onnx") as m:  # no keys configured: the copy is made
        assert m.backend.session_source == "created"


def test_edited_manifest_is_refused(signed, keys):
    m = json.loads((signed / "inferneo.json").read_text())
    m["name"] = "renamed"
    (signed / "inferneo.json").write_text(json.dumps(m))
    with pytest.raises(SignatureError, match="changed after signing"):
        inferneo_runtime.load(signed, trusted_keys=[keys["ci"]["public_key"]])


def test_swapped_file_with_updated_checksum_is_refused(signed, keys):
    data = signed / "onnx" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    m = json.loads((signed / "inferneo.json").read_text())
    for f in m["targets"]["onnx"]["files"]:
        if f["path"] == "onnx/model.onnx.data":
            f["sha256"] = hashlib.sha256(raw).hexdigest()
    (signed / "inferneo.json").write_text(json.dumps(m, indent=2))
    with inferneo_runtime.load(signed):  # checksums alone are fooled by a consistent rewrite...
        pass
    with pytest.raises(SignatureError, match=keys["ci"]["key_id"]):  # ...the signature is not
        inferneo_runtime.load(signed, trusted_keys=[keys["ci"]["public_key"]])


def test_other_key_and_unsigned_are_refused(signed, keys, tiny_artifact):
    other = keys["other"]["public_key"]
    with pytest.raises(SignatureError, match=f"signed by key {keys['ci']['key_id']}.*not among the trusted keys"):
        inferneo_runtime.load(signed, trusted_keys=[other])
    r = run_cli("generate", str(tiny_artifact("llama")), "hi", "--trusted-key", other)
    assert r.returncode == 9 and "not signed" in r.stderr


def test_sign_push_load_from_s3(signed, keys, s3env, bucket, tiny_artifact, tmp_path):
    unsigned = tmp_path / "unsigned"
    shutil.copytree(tiny_artifact("llama"), unsigned)
    r = run_cli("push", str(unsigned), f"s3://{bucket}/m", "--json", "--sign", keys["ci"]["private_key"])
    assert r.returncode == 0, r.stderr
    pub = keys["ci"]["public_key"]
    with inferneo_runtime.load(f"s3://{bucket}/m", trusted_keys=[pub]) as m:
        assert m.generate("Hello", max_new_tokens=2).token_ids
    with pytest.raises(SignatureError):
        inferneo_runtime.load(f"s3://{bucket}/m", trusted_keys=[keys["other"]["public_key"]])


def test_build_sign_then_a_garbled_or_missing_signature_exits_9(keys, tiny_checkpoint, tmp_path, s3env, bucket, client):
    from conftest import tiny_recipe_fields, write_recipe

    out = tmp_path / "art"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, targets=("onnx",)))
    r = run_cli("build", str(recipe), "--sign", keys["ci"]["private_key"], "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    trusted = {"INFERNEO_TRUSTED_KEYS": keys["ci"]["public_key"]}
    r = run_cli("validate", str(out), "--json", env=trusted)
    assert r.returncode == 0 and json.loads(r.stdout)["signed_by"] == keys["ci"]["key_id"], r.stdout + r.stderr
    r = run_cli("push", str(out), f"s3://{bucket}/signed", "--json")  # the signature travels with it
    assert r.returncode == 0, r.stderr
    version = json.loads(client.get_object(Bucket=bucket, Key="signed/LATEST")["Body"].read())["version"]

    signature = out / "inferneo.sig"
    signature.write_bytes(signature.read_bytes()[:-10] + b"garbled!!!")
    r = run_cli("validate", str(out), "--json", env=trusted)
    assert r.returncode == 9, r.stdout + r.stderr
    signature.unlink()
    r = run_cli("validate", str(out), "--json", env=trusted)
    assert r.returncode == 9 and "not signed" in r.stdout + r.stderr
    assert run_cli("validate", str(out), "--json").returncode == 0  # without keys, checksums alone decide

    # the same from S3: a garbled signature object is refused before the model is used
    client.put_object(Bucket=bucket, Key=f"signed/versions/{version}/inferneo.sig", Body=b"{}")
    r = run_cli("generate", f"s3://{bucket}/signed", "hi", "--max-new-tokens", "2", env=trusted)
    assert r.returncode == 9, r.stdout + r.stderr


@pytest.mark.parametrize("evil", ["../../x", "/etc/passwd", "onnx/../../x"])
def test_manifest_path_traversal_refused_before_any_read(tiny_artifact, tmp_path, evil):
    art = tmp_path / "a"
    shutil.copytree(tiny_artifact("llama"), art)
    m = json.loads((art / "inferneo.json").read_text())
    m["root_files"][0]["path"] = evil
    (art / "inferneo.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="must be relative"):
        inferneo_runtime.load(art)


def test_symlink_out_of_artifact_refused(tiny_artifact, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(tiny_artifact("llama"), art)
    outside = tmp_path / "outside.json"
    shutil.copy(art / "tokenizer.json", outside)
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(outside)  # same bytes, so only the location gives it away
    with pytest.raises(inferneo_runtime.IntegrityError, match="outside the artifact"):
        inferneo_runtime.load(art)


def test_recipe_target_name_cannot_be_a_path(tmp_path, tiny_checkpoint):
    from inferneo_build.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "source": {"path": str(tiny_checkpoint("llama"))},
                                    "targets": [{"format": "onnx", "name": "../../escape"}],
                                    "validation": {"prompts": ["a"]}}))
    with pytest.raises(RecipeError, match="targets.0.name"):
        load_recipe(path)


# -- fuzzing: every malformed input is a clear error, never a traceback or a partial write ----------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25)
recipe_keys = st.sampled_from(["name", "source", "targets", "shapes", "validation", "output", "task", "dtype", "bogus"])
recipes = st.dictionaries(recipe_keys, json_values, max_size=8) | json_values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=recipes)
def test_fuzzed_recipes_give_clear_errors(tmp_path, doc):
    from inferneo_build.recipe import RecipeError, load_recipe

    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(path)
    except RecipeError as e:
        assert str(path) in str(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz.yaml"]  # nothing written


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(["schema_version", "name", "task", "targets", "root_files", "model",
                                             "source", "goldens", "generation"]), json_values, max_size=9)
       .map(lambda d: {**d, "schema_version": d.get("schema_version", 1)}), raw=st.binary(max_size=64))
def test_fuzzed_manifests_give_clear_errors(tmp_path, doc, raw):
    from inferneo_runtime.manifest import read_manifest

    for content in (json.dumps(doc).encode(), raw):
        (tmp_path / "inferneo.json").write_bytes(content)
        with pytest.raises(ManifestError, match="inferneo.json"):
            read_manifest(tmp_path)
