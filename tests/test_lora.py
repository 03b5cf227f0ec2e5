"""LoRA adapters (PEFT format) merged before export: the artifact's greedy output equals PEFT's own merge."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import PROMPTS, tiny_recipe_fields
from inferneo_build import build
from inferneo_build.lora import AdapterError, read_adapter
from inferneo_build.recipe import Recipe, RecipeError, load_recipe
from inferneo_runtime import load

peft = pytest.importorskip("peft")

TARGET_MODULES = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def make_adapter(checkpoint, out, model_type="llama", seed=1, r=4, alpha=16):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved the way PEFT saves it."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGET_MODULES[model_type], init_lora_weights=False,
                             fan_in_fan_out=model_type == "gpt2", lora_dropout=0.0)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # make the delta big enough to move greedy tokens of a random-weight model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(out)
    return out


def peft_merged_greedy(checkpoint, adapter, prompt_ids, n):
    """Greedy tokens from PEFT's merge_and_unload (the reference the artifact must reproduce)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(n):
                seq.append(int(merged(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(ids):])
    return outs


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_adapter_changes_greedy_output_exactly_as_peft_merge(model_type, tiny_checkpoint, tiny_artifact, tmp_path):
    ckpt = tiny_checkpoint(model_type)
    adapter = make_adapter(ckpt, tmp_path / "adapter", model_type)
    out = tmp_path / "lora"
    fields = tiny_recipe_fields(ckpt, "tiny-lora", out, targets=("onnx",))
    fields["source"]["adapters"] = [str(adapter)]
    built = build(Recipe.model_validate(fields))

    n = 12
    with load(built.output) as lora_model, load(tiny_artifact(model_type), target="onnx") as base_model:
        prompt_ids = [lora_model.encode(p) for p in PROMPTS]
        got = [lora_model.generate_ids([ids], _greedy(n))[0].token_ids for ids in prompt_ids]
        base = [base_model.generate_ids([ids], _greedy(n))[0].token_ids for ids in prompt_ids]
    assert got == peft_merged_greedy(ckpt, adapter, prompt_ids, n)
    assert got != base  # the adapter really changed the model

    info = built.manifest.source.adapters
    assert len(info) == 1 and info[0].rank == 4 and info[0].alpha == 16
    assert info[0].sha256 == read_adapter(adapter).info.sha256
    assert sorted(info[0].target_modules) == sorted(TARGET_MODULES[model_type])
    assert "merged LoRA" in json.loads((built.output / "validation.json").read_text())["reference"]


def _greedy(n):
    from inferneo_runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_adapter_hash_is_part_of_the_build_key(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    a1 = make_adapter(ckpt, tmp_path / "a1", seed=1)
    a2 = make_adapter(ckpt, tmp_path / "a2", seed=2)
    assert read_adapter(a1).info.sha256 != read_adapter(a2).info.sha256
    from inferneo_build import source
    from inferneo_build.build import _with_adapters
    from dataclasses import replace

    recipe = Recipe.model_validate(tiny_recipe_fields(ckpt, "k", tmp_path / "k", targets=("onnx",)))
    checkpoint = source.resolve(recipe)
    keys = {_with_adapters("base", replace(checkpoint, info=checkpoint.info.model_copy(
        update={"adapters": [read_adapter(a).info]}))) for a in (a1, a2)}
    assert len(keys) == 2 and "base" not in keys


def test_unsupported_adapters_are_refused(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    adapter = make_adapter(ckpt, tmp_path / "dora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter(adapter)

    wrong = make_adapter(tiny_checkpoint("gpt2"), tmp_path / "gpt2-adapter", "gpt2")
    fields = tiny_recipe_fields(ckpt, "wrong", tmp_path / "wrong", targets=("onnx",))
    fields["source"]["adapters"] = [str(wrong)]
    with pytest.raises(AdapterError, match="not in this checkpoint"):
        build(Recipe.model_validate(fields))
    assert not (tmp_path / "wrong").exists()


def test_recipe_names_a_missing_adapter(tiny_checkpoint, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: x
source:
  path: {tiny_checkpoint('llama')}
  adapters:
    - {tmp_path / 'nope'}
targets: [{{format: onnx}}]
validation: {{prompts: [hi]}}
""")
    with pytest.raises(RecipeError, match=r"r.yaml:5: source.adapters.0: .* not a PEFT adapter directory"):
        load_recipe(recipe)
