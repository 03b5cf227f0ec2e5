"""Tiny random-weight models end to end: build → manifest → runtime greedy == transformers generate."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import inferneo_runtime
from conftest import PROMPTS, run_cli, tiny_recipe_fields, write_recipe
from inferneo_runtime.generation import GenerationParams
from inferneo_runtime.manifest import read_manifest

MODEL_TYPES = ["llama", "gpt2", "qwen2", "mistral"]


def _hf_greedy(checkpoint, prompt_ids, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run all n steps, as ignore_eos does (min_new_tokens would ban EOS)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("target", ["onnx", "torchscript"])
def test_greedy_matches_transformers(model_type, target, tiny_artifact, tiny_checkpoint):
    artifact = tiny_artifact(model_type)
    with inferneo_runtime.load(artifact, target=target) as model:
        for prompt in PROMPTS:
            ids = model.tokenizer.encode(prompt)
            # ignore_eos: random weights may emit EOS early; compare the full 20 steps
            out = model.generate_ids([ids], GenerationParams(max_new_tokens=20, ignore_eos=True))[0]
            assert out.token_ids == _hf_greedy(tiny_checkpoint(model_type), ids, 20), (model_type, target, prompt)


def test_manifest_describes_every_file(tiny_artifact):
    artifact = tiny_artifact("llama")
    m = json.loads((artifact / "inferneo.json").read_text())
    assert m["schema_version"] == 1 and m["architecture"] == "llama"
    assert set(m["targets"]) == {"onnx", "torchscript"}
    listed = {f["path"] for f in m["root_files"]}
    for t in m["targets"].values():
        assert t["status"] == "valid" and t["validation"]["status"] == "passed"
        assert t["validation"]["token_match"] is True
        assert t["validation"]["max_abs_logits_error"] <= t["validation"]["logits_atol"]
        assert t["io"]["inputs"] and t["io"]["outputs"] and t["shapes"]["max_sequence"] == 128
        listed |= {f["path"] for f in t["files"]}
    for rel in listed:
        entry = next(f for f in m["root_files"] + sum((t["files"] for t in m["targets"].values()), []) if f["path"] == rel)
        data = (artifact / rel).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert on_disk - listed == {"inferneo.json"}  # every file but the manifest itself is listed
    assert (artifact / "config.json").is_file() and (artifact / "onnx" / "model.onnx").is_file()
    assert len(m["goldens"]) == len(PROMPTS) and all(g["tokens"] for g in m["goldens"])
    assert m["toolchain"]["torch"].startswith("2.13")
    v = json.loads((artifact / "validation.json").read_text())
    assert {t["target"] for t in v["targets"]} == {"onnx", "torchscript"}


def test_goldens_rerun_through_cli(tiny_artifact):
    r = run_cli("validate", str(tiny_artifact("gpt2")), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and {k: v["status"] for k, v in report["targets"].items()} == {"onnx": "passed", "torchscript": "passed"}


def test_generate_and_inspect_cli(tiny_artifact):
    artifact = tiny_artifact("llama")
    r = run_cli("generate", str(artifact), PROMPTS[0], "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert g["target"] == "onnx" and 1 <= len(g["token_ids"]) <= 8 and g["finish_reason"] in ("stop", "length")
    with inferneo_runtime.load(artifact, target="torchscript") as model:
        same = model.generate(PROMPTS[0], max_new_tokens=8)
    assert same.token_ids == g["token_ids"]
    r = run_cli("inspect", str(artifact), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "tiny-llama"
    r = run_cli("inspect", str(artifact))
    assert r.returncode == 0 and "onnx" in r.stdout and "passed" in r.stdout
    mixed = read_manifest(artifact).targets["onnx"].validation.mixed_step_max_abs_error
    assert f"from its two forwards: onnx {mixed:.2g}" in " ".join(r.stdout.split())  # the mixed step's check


def test_unknown_target_is_clear(tiny_artifact):
    with pytest.raises(inferneo_runtime.InferneoError, match="no target 'tensorrt'.*onnx"):
        inferneo_runtime.load(tiny_artifact("llama"), target="tensorrt")


def test_request_over_max_sequence_is_clear(tiny_artifact):
    with inferneo_runtime.load(tiny_artifact("llama")) as model:
        with pytest.raises(inferneo_runtime.RequestError, match="max_sequence 128"):
            model.generate("hello " * 10, max_new_tokens=125)


def test_batch_equals_single(tiny_artifact):
    # more prompts than max_batch (4): later prompts take slots freed by finished ones
    prompts = PROMPTS + ["a", "The lazy dog", "ahead of time, and"]
    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(tiny_artifact("qwen2"), target=target) as model:
            ids = [model.tokenizer.encode(p) for p in prompts]
            params = GenerationParams(max_new_tokens=12)
            batched = model.generate_ids(ids, params)
            for i, p in enumerate(ids):
                assert batched[i].token_ids == model.generate_ids([p], params)[0].token_ids, (target, i)


def test_hub_source_reads_the_revision_from_the_local_hf_cache(tiny_checkpoint, tmp_path, monkeypatch):
    # `source: {hf: ..., revision: ...}` reads the local Hugging Face cache offline: the named commit, else the
    # commit `main` points at; a repo the cache lacks is an input error that says how to get it
    from safetensors.numpy import load_file, save_file

    from inferneo_runtime.manifest import read_manifest, sha256_file

    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-llama"
    old, new = "a" * 40, "b" * 40
    shutil.copytree(tiny_checkpoint("llama"), repo / "snapshots" / old)
    shutil.copytree(tiny_checkpoint("llama"), repo / "snapshots" / new)
    weights = load_file(repo / "snapshots" / new / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, repo / "snapshots" / new / "model.safetensors", metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}

    def recipe(revision, out):
        fields = tiny_recipe_fields(tiny_checkpoint("llama"), "hub", tmp_path / out, targets=("onnx",))
        fields["source"] = {"hf": "acme/tiny-llama", **({"revision": revision} if revision else {})}
        return write_recipe(tmp_path / f"{out}.yaml", **fields)

    def build(revision, out):
        return run_cli("build", str(recipe(revision, out)), "--json", env=env)

    def weights_sha256(snapshot):  # the weights of that snapshot, hashed as the manifest records them
        digest = hashlib.sha256()
        for f in sorted(f.name for f in (repo / "snapshots" / snapshot).glob("*.safetensors")):
            digest.update(f.encode() + b"\0" + sha256_file(repo / "snapshots" / snapshot / f).encode())
        return digest.hexdigest()

    r = build(old, "pinned")  # one whole build from the cache, pinned to the older commit
    assert r.returncode == 0, r.stdout + r.stderr
    source = read_manifest(tmp_path / "pinned").source
    assert (source.kind, source.uri, source.revision) == ("hf", "acme/tiny-llama", old)
    assert source.weights_sha256 == weights_sha256(old)
    # no revision: the commit `main` points at (resolved as a build does, without compiling again)
    import huggingface_hub.constants

    from inferneo_build.recipe import load_recipe
    from inferneo_build.source import resolve_checkpoint as resolve

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at call time
    checkpoint = resolve(load_recipe(recipe(None, "main")))
    assert checkpoint.directory == repo / "snapshots" / new
    assert checkpoint.info.revision == new and checkpoint.info.weights_sha256 == weights_sha256(new)
    r = build("c" * 40, "missing")
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stdout + r.stderr
    assert not (tmp_path / "missing").exists()
