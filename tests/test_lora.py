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

TARGET_MODULES = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
                  "qwen2": ["q_proj", "k_proj", "o_proj", "gate_proj"], "mistral": ["q_proj", "v_proj", "up_proj", "down_proj"]}


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
    """Greedy tokens from PEFT's merge_and_unload (the reference the artifact must reproduce); `adapter` may be a
    list, merged one after another (none: the base model)."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for one in adapter if isinstance(adapter, list) else [adapter]:
        merged = peft.PeftModel.from_pretrained(merged, one).merge_and_unload()
    merged.eval()
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


def test_changed_adapter_weights_at_the_same_path_rebuild(tiny_checkpoint, tmp_path):
    """The build key covers the adapter's weights, not its path: rewriting the adapter in place makes `build()`
    rebuild (and the artifact carries the new adapter); an unchanged one is up to date."""
    ckpt = tiny_checkpoint("llama")
    adapter = make_adapter(ckpt, tmp_path / "adapter", seed=1)
    fields = tiny_recipe_fields(ckpt, "k", tmp_path / "k", targets=("onnx",))
    fields["source"]["adapters"] = [str(adapter)]
    fields["validation"]["max_new_tokens"] = 4
    recipe = Recipe.model_validate(fields)
    first = build(recipe)
    assert first.cached is None and build(recipe).cached == "output"  # unchanged: nothing rebuilt

    make_adapter(ckpt, adapter, seed=2)  # same path, new weights
    second = build(recipe)
    assert second.cached is None, "changed adapter weights did not rebuild"
    old, new = first.manifest.source.adapters[0].sha256, second.manifest.source.adapters[0].sha256
    assert old != new == read_adapter(adapter).info.sha256
    assert first.manifest.build_key != second.manifest.build_key


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_stacked_adapters_merge_as_peft_does(model_type, tiny_checkpoint, tmp_path):
    """Two adapters in `source.adapters` are both merged, in order, as PEFT merges one after the other; on
    qwen2 (tied embeddings, k/o/gate projections) and mistral (one KV head)."""
    ckpt = tiny_checkpoint(model_type)
    adapters = [make_adapter(ckpt, tmp_path / f"a{i}", model_type, seed=i) for i in (1, 2)]
    fields = tiny_recipe_fields(ckpt, "stacked", tmp_path / "stacked", targets=("onnx",))
    fields["source"]["adapters"] = [str(a) for a in adapters]
    built = build(Recipe.model_validate(fields))
    assert [a.sha256 for a in built.manifest.source.adapters] == [read_adapter(a).info.sha256 for a in adapters]

    n = 8
    with load(built.output) as model:
        prompt_ids = [model.encode(p) for p in PROMPTS]
        got = [model.generate_ids([ids], _greedy(n))[0].token_ids for ids in prompt_ids]
    assert got == peft_merged_greedy(ckpt, adapters, prompt_ids, n)
    assert got != peft_merged_greedy(ckpt, adapters[:1], prompt_ids, n)  # the second adapter counted
    assert got != peft_merged_greedy(ckpt, [], prompt_ids, n)


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


@pytest.mark.parametrize("extra, what", [({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
                                         ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication")])
def test_adapters_peft_does_not_merge_as_b_at_a_are_refused(extra, what, tiny_checkpoint, tmp_path):
    """aLoRA (PEFT itself refuses to merge it) and layer_replication (the adapted model repeats base layers, so
    PEFT's merge differs from adding B @ A to the base's layers) were merged silently, as plain LoRA."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint("llama")
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             lora_dropout=0.0, **extra)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterError, match=rf"{tmp_path / 'adapter'}: {what}.* cannot be merged"):
        read_adapter(tmp_path / "adapter")


def test_fan_in_fan_out_on_linear_modules_merges_as_peft(tiny_checkpoint, tmp_path):
    """PEFT ignores fan_in_fan_out=True on a torch.nn.Linear (it warns and uses B @ A as is); the merge transposed
    the delta, silently wrong on a square weight (q_proj)."""
    from transformers import AutoModelForCausalLM

    from inferneo_build.lora import merge_adapters

    ckpt = tiny_checkpoint("llama")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                              lora_dropout=0.0)).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "fan_in_fan_out": True}))

    ours = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    merged = merge_adapters(ours, [read_adapter(tmp_path / "adapter")])
    assert merged and all(name.endswith("q_proj") for name in merged)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        want = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                              tmp_path / "adapter").merge_and_unload().state_dict()
    got = ours.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_config_without_lora_alpha_merges_with_peft_default(tiny_checkpoint, tmp_path):
    """A hand-written adapter_config.json without lora_alpha: PEFT loads it with its default (8), not with r, so the
    scale is 8 / r; the merge must equal PEFT's."""
    from transformers import AutoModelForCausalLM

    from inferneo_build.lora import merge_adapters

    ckpt = tiny_checkpoint("llama")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False, lora_dropout=0.0)).save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))

    ours = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert merge_adapters(ours, [read_adapter(tmp_path / "a")])
    want = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                          tmp_path / "a").merge_and_unload().state_dict()
    got = ours.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
