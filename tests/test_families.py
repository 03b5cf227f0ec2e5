"""Issue 21's families, fused path: tiny random-weight checkpoints built into ONNX and TorchScript; greedy tokens
equal transformers' for 24 steps, alone and in a batch of two prompts of different lengths."""
from __future__ import annotations

import pytest
import torch

import inferneo_runtime
from inferneo_runtime.generation import GenerationParams
from inferneo_runtime.manifest import read_manifest

MOE_FAMILIES = {"qwen3_moe-fused", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"}
FAMILIES = ["qwen3", "llama3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2", "smollm3", "ministral",
            "qwen3_moe-fused", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"]
PROMPTS = ["The quick brown fox", "Hello world, this is a tiny tokenizer. Inferneo compiles"]
STEPS = 24


def hf_greedy(checkpoint, prompt_ids, n):
    """Greedy tokens from transformers, one forward per token over its cache (what `generate` runs, except that
    Phi-3's generate drops the cache once the sequence passes LongRoPE's switch; see README)."""
    from transformers import AutoModelForCausalLM

    # eager: transformers' sdpa path drops Gemma 2's attention soft-capping
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    ids, past, out = torch.tensor([prompt_ids]), None, []
    with torch.inference_mode():
        for _ in range(n):
            step = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = step.past_key_values
            ids = step.logits[:, -1:].argmax(-1)
            out.append(int(ids))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_matches_transformers(family, tiny_artifact, tiny_checkpoint):
    artifact = tiny_artifact(family)
    checkpoint = tiny_checkpoint(family)
    with inferneo_runtime.load(artifact, target="onnx") as model:
        ids = [model.tokenizer.encode(p) for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])
    expected = [hf_greedy(checkpoint, p, STEPS) for p in ids]
    assert any(len(set(e)) >= 4 for e in expected), expected  # varied enough to catch a wrong layer
    params = GenerationParams(max_new_tokens=STEPS, ignore_eos=True)
    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(artifact, target=target) as model:
            for p, e in zip(ids, expected):
                assert model.generate_ids([p], params)[0].token_ids == e, (family, target, "alone")
            batched = model.generate_ids(ids, params)
            assert [b.token_ids for b in batched] == expected, (family, target, "batch")
            # in chunks of 3, the later prompts' chunks run in the earlier ones' decode steps (onnx: one forward)
            model.prefill_chunk = 3
            chunked = model.generate_ids(ids, params)
            assert [c.token_ids for c in chunked] == expected, (family, target, "chunked")
            # onnx decodes and prefills in one forward, except a mixture of experts (onnx_mixed._ROUTED)
            assert model.backend.mixes_steps == (target == "onnx" and family not in MOE_FAMILIES)
    # the build checked the onnx target's mixed step against its two forwards
    mixed = read_manifest(artifact).targets["onnx"].validation.mixed_step_max_abs_error
    assert mixed is None if family in MOE_FAMILIES else mixed <= 1e-4


def test_tied_embedding_stored_once_in_torchscript(tiny_artifact):
    """Qwen3's tiny checkpoint ties lm_head to the embedding: model.pt holds that matrix once."""
    artifact = tiny_artifact("qwen3")
    module = torch.jit.load(str(artifact / "torchscript" / "model.pt"))
    params = dict(module.named_parameters())
    vocab_sized = [name for name, p in params.items() if 512 in p.shape or p.numel() % 512 == 0 and p.numel() >= 512 * 64]
    assert vocab_sized == ["embed"], vocab_sized


# Config settings transformers' modeling code reads differently from what the config's names suggest.
_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, head_dim=32)
READ_AS_TRANSFORMERS = {
    # Gemma 3's config keeps attn_logit_softcapping, its attention never applies it (either transformers major)
    "gemma3-softcap": _BASE | dict(model_type="gemma3_text", sliding_window=6, query_pre_attn_scalar=24,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                   layer_types=["sliding_attention", "full_attention"]),
    # the official Gemma configs' pair: GemmaMLP reads hidden_act (4.x: the exact GELU; 5.x maps it to the tanh one);
    # either way the fused exporters (onnx too) run what transformers runs
    "gemma-legacy-gelu": _BASE | dict(model_type="gemma", hidden_act="gelu", hidden_activation="gelu_pytorch_tanh",
                                      intermediate_size=512, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(READ_AS_TRANSFORMERS))
def test_config_read_as_transformers_reads_it(name, tiny_checkpoint, tmp_path):
    """These failed their build's validation (the fused graph applied what transformers does not); each now builds
    fused (an onnx target too) and decodes transformers' tokens."""
    import tiny_models
    from conftest import tiny_recipe_fields
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    tiny_models.TINY_CONFIGS.setdefault(name, READ_AS_TRANSFORMERS[name])
    tiny_models._VARIED.add(name)
    checkpoint = tiny_checkpoint(name)
    fields = tiny_recipe_fields(checkpoint, f"tiny-{name}", tmp_path / "out")
    fields["targets"] = [{"format": "torchscript"}, {"format": "onnx", "optional": True}]
    artifact = build(Recipe.model_validate(fields)).output
    targets = read_manifest(artifact).targets
    assert targets["onnx"].status == "valid", targets["onnx"]
    params = GenerationParams(max_new_tokens=STEPS, ignore_eos=True)
    for target in ("torchscript", "onnx"):
        with inferneo_runtime.load(artifact, target=target) as model:
            for prompt in PROMPTS:
                ids = model.tokenizer.encode(prompt)
                expected = hf_greedy(checkpoint, ids, STEPS)
                assert model.generate_ids([ids], params)[0].token_ids == expected, (name, target, prompt)


def test_an_onnx_target_the_model_cannot_take_is_skipped_when_optional(tiny_checkpoint, tmp_path):
    """head_dim 24 (GroupQueryAttention wants a multiple of 16): an optional onnx target is skipped with the reason
    and the torchscript target still builds; a required one is the recipe's error (exit 2), not an unexpected one."""
    import tiny_models
    from conftest import tiny_recipe_fields
    from inferneo_build import build
    from inferneo_build.exporters import TargetUnsupported
    from inferneo_build.recipe import Recipe

    name = "llama-head-dim-24"
    tiny_models.TINY_CONFIGS.setdefault(name, _BASE | dict(model_type="llama", hidden_size=96, head_dim=24))
    checkpoint = tiny_checkpoint(name)
    fields = tiny_recipe_fields(checkpoint, "tiny-hd24", tmp_path / "out")
    fields["targets"] = [{"format": "torchscript"}, {"format": "onnx", "optional": True}]
    targets = read_manifest(build(Recipe.model_validate(fields)).output).targets
    assert targets["torchscript"].status == "valid"
    assert targets["onnx"].status == "skipped" and "multiple of 16" in targets["onnx"].validation.reason
    fields["targets"] = [{"format": "onnx"}]
    fields["output"] = str(tmp_path / "out-required")
    with pytest.raises(TargetUnsupported, match="head_dim 24") as e:
        build(Recipe.model_validate(fields))
    assert e.value.exit_code == 2 and not (tmp_path / "out-required").exists()

