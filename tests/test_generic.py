"""The generic path: model types outside the fused table are exported from transformers' own modeling code
(traced into the torchscript target), validated fail-closed like every target, and labelled generic."""
from __future__ import annotations

import json

import pytest

import inferneo_runtime
from conftest import run_cli, tiny_recipe_fields, write_recipe
from inferneo_runtime.generation import GenerationParams
from test_families import PROMPTS, STEPS, hf_greedy

GENERIC_TYPES = ["gpt_neox", "stablelm", "phi", "starcoder2", "falcon"]


@pytest.fixture(scope="module")
def generic_artifact(tiny_checkpoint, tmp_path_factory):
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    built = {}

    def get(model_type: str):
        if model_type not in built:
            out = tmp_path_factory.mktemp(f"generic-{model_type}") / model_type
            fields = tiny_recipe_fields(tiny_checkpoint(model_type), f"tiny-{model_type}", out)
            fields["targets"] = [{"format": "torchscript"}, {"format": "onnx", "optional": True}]
            built[model_type] = build(Recipe.model_validate(fields)).output
        return built[model_type]

    return get


@pytest.mark.parametrize("model_type", GENERIC_TYPES)
def test_generic_greedy_matches_transformers(model_type, generic_artifact, tiny_checkpoint):
    artifact = generic_artifact(model_type)
    manifest = json.loads((artifact / "inferneo.json").read_text())
    assert manifest["model"]["family"] == "generic" and manifest["architecture"] == model_type
    ts = manifest["targets"]["torchscript"]
    assert ts["status"] == "valid" and ts["toolchain"]["path"] == "generic"
    assert ts["validation"]["token_match"] is True
    # the fused-only onnx target is skipped with the reason, not silently dropped
    assert manifest["targets"]["onnx"]["status"] == "skipped"
    assert "generic path" in manifest["targets"]["onnx"]["validation"]["reason"]

    with inferneo_runtime.load(artifact, target="torchscript") as model:
        ids = [model.tokenizer.encode(p) for p in PROMPTS]
        expected = [hf_greedy(tiny_checkpoint(model_type), p, STEPS) for p in ids]
        assert any(len(set(e)) >= 4 for e in expected), expected
        params = GenerationParams(max_new_tokens=STEPS, ignore_eos=True)
        for p, e in zip(ids, expected):
            assert model.generate_ids([p], params)[0].token_ids == e, (model_type, "alone")
        assert [b.token_ids for b in model.generate_ids(ids, params)] == expected, (model_type, "batch")


def test_build_cli_says_generic(tiny_checkpoint, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", **tiny_recipe_fields(
        tiny_checkpoint("stablelm"), "tiny-stablelm", tmp_path / "out", targets=("torchscript",)))
    r = run_cli("build", str(recipe))
    assert r.returncode == 0, r.stderr
    assert "generic path for model_type 'stablelm'" in r.stderr


def test_generic_onnx_target_fails_clearly(tiny_checkpoint, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", **tiny_recipe_fields(
        tiny_checkpoint("stablelm"), "tiny-stablelm", tmp_path / "out", targets=("onnx",)))
    r = run_cli("build", str(recipe))
    assert r.returncode == 5, r.stderr
    assert "generic path" in r.stderr and "torchscript" in r.stderr
    assert not (tmp_path / "out").exists()


def test_generic_beside_fused(tiny_checkpoint, tmp_path):
    """`path: generic` traces transformers' code for a fused model_type too, as a second target to compare."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-llama", tmp_path / "out")
    fields["targets"] = [{"format": "torchscript"}, {"format": "torchscript", "path": "generic"}]
    artifact = build(Recipe.model_validate(fields)).output
    targets = json.loads((artifact / "inferneo.json").read_text())["targets"]
    assert set(targets) == {"torchscript", "torchscript-generic"}
    assert targets["torchscript-generic"]["toolchain"]["path"] == "generic"
    assert "path" not in targets["torchscript"]["toolchain"]
    params = GenerationParams(max_new_tokens=STEPS, ignore_eos=True)
    outs = {}
    for name in targets:
        with inferneo_runtime.load(artifact, target=name) as model:
            outs[name] = model.generate_ids([model.tokenizer.encode(PROMPTS[1])], params)[0].token_ids
    assert outs["torchscript"] == outs["torchscript-generic"]


# Per-layer attention types on the generic path: a window on the sliding layers only, wider than the validation
# prompts' sequences (so validation alone cannot tell), crossed by a longer greedy decode.
_ALTERNATING = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                    sliding_window=40, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
ALTERNATING_TYPES = {"olmo3-alternating": dict(model_type="olmo3"), "ministral-alternating": dict(model_type="ministral")}


@pytest.mark.parametrize("name", sorted(ALTERNATING_TYPES))
def test_generic_alternating_windows_match_transformers(name, tiny_checkpoint, tmp_path):
    """OLMo 3 / Ministral mask each layer by its layer type; one windowed 4-D mask for every layer windowed the
    full-attention layers too: validated, yet tokens past the window differed from transformers'."""
    import tiny_models
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    tiny_models.TINY_CONFIGS.setdefault(name, _ALTERNATING | ALTERNATING_TYPES[name])
    tiny_models._VARIED.add(name)
    checkpoint = tiny_checkpoint(name)
    fields = tiny_recipe_fields(checkpoint, f"tiny-{name}", tmp_path / "out", targets=("torchscript",))
    artifact = build(Recipe.model_validate(fields)).output
    steps = 48  # prompt 0 (4 tokens) + 48 > the window of 40
    with inferneo_runtime.load(artifact, target="torchscript") as model:
        assert model.manifest.model.family == "generic"
        ids = model.tokenizer.encode(PROMPTS[0])
        expected = hf_greedy(checkpoint, ids, steps)
        assert len(set(expected)) >= 4, expected
        got = model.generate_ids([ids], GenerationParams(max_new_tokens=steps, ignore_eos=True))[0].token_ids
    assert got == expected


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def test_moe_traces_through_tensor_routing_or_is_refused(tiny_checkpoint, tmp_path):
    """transformers 5 routes MoE experts with tensor ops (grouped_mm): the trace keeps every input's routing and
    greedy tokens equal transformers', alone and batched. transformers 4 loops in Python over the experts an input
    reaches, which a trace would freeze: refused before export (exit 2), naming what to use instead."""
    checkpoint = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "out"
    # qwen3_moe has a fused entry too (test_families): path generic asks for transformers' own code
    fields = tiny_recipe_fields(checkpoint, "tiny-moe", out)
    fields["targets"] = [{"format": "torchscript", "path": "generic"}]
    recipe = write_recipe(tmp_path / "recipe.yaml", **fields)
    r = run_cli("build", str(recipe))
    if _transformers_major() < 5:
        assert r.returncode == 2, r.stderr
        assert "mixture of experts" in r.stderr and "transformers>=5" in r.stderr, r.stderr
        assert not out.exists()
        return
    assert r.returncode == 0, r.stderr
    with inferneo_runtime.load(out, target="torchscript-generic") as model:
        ids = [model.tokenizer.encode(p) for p in PROMPTS]
        expected = [hf_greedy(checkpoint, p, STEPS) for p in ids]
        assert any(len(set(e)) >= 4 for e in expected), expected
        params = GenerationParams(max_new_tokens=STEPS, ignore_eos=True)
        assert [model.generate_ids([p], params)[0].token_ids for p in ids] == expected
        assert [b.token_ids for b in model.generate_ids(ids, params)] == expected


def test_hybrid_state_space_model_is_refused_naming_it(tiny_checkpoint, tmp_path):
    """Mamba layers keep state a key/value cache cannot hold: exit 2 naming the model type, nothing written."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", **tiny_recipe_fields(tiny_checkpoint("bamba"), "tiny-bamba", out,
                                                                         targets=("torchscript",)))
    r = run_cli("build", str(recipe))
    assert r.returncode == 2, r.stderr
    assert "model_type 'bamba' does not run on a key/value cache alone" in r.stderr, r.stderr
    assert not out.exists()
