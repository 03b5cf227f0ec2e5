"""Safe loading (issue #11): pickle weights and checkpoint code run only when the recipe opts in."""
from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch

from conftest import run_cli, tiny_recipe_fields, write_recipe
from inferneo_build import build, load_recipe
from inferneo_build import source as sources
from inferneo_build.lora import AdapterError, read_adapter
from inferneo_build.recipe import Recipe


def _fails(recipe_path, out, *needles):
    r = run_cli("build", str(recipe_path), "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    message = json.loads(r.stdout)["message"]
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    return message


@pytest.fixture
def pickle_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny llama saved the old way: pytorch_model.bin (a pickle), no safetensors."""
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("llama")
    dest = tmp_path / "pickled"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    # torch.save directly: transformers 5's save_pretrained writes safetensors only
    torch.save(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict(), dest / "pytorch_model.bin")
    assert (dest / "pytorch_model.bin").is_file() and not list(dest.glob("*.safetensors"))
    return dest


def test_pickle_weights_need_allow_pickle(pickle_checkpoint, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    fields = tiny_recipe_fields(pickle_checkpoint, "pickled", out, targets=("onnx",))
    fields["validation"]["max_new_tokens"] = 4
    message = _fails(write_recipe(tmp_path / "r.yaml", **fields), out, "pytorch_model.bin", "allow_pickle: true",
                     "safetensors")
    assert str(pickle_checkpoint) in message

    built = build(load_recipe(write_recipe(tmp_path / "ok.yaml", **fields, allow_pickle=True)))
    source = built.manifest.source
    assert source.allow_pickle is True and source.trust_remote_code is None
    assert built.manifest.targets["onnx"].validation.status == "passed"
    # the same tensors as the safetensors original: the reference greedy tokens agree
    safe = build(Recipe.model_validate({**fields, "source": {"path": str(tiny_checkpoint("llama"))},
                                        "output": str(tmp_path / "safe")}))
    assert [g.tokens for g in built.manifest.goldens] == [g.tokens for g in safe.manifest.goldens]
    assert "allow_pickle" not in json.loads((tmp_path / "safe" / "inferneo.json").read_text())["source"]


def test_safetensors_beside_pickles_are_the_only_weights_read(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "both"
    shutil.copytree(tiny_checkpoint("llama"), ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not a pickle: must never be read")
    (ckpt / "training_args.bin").write_bytes(b"nor this")
    recipe = Recipe.model_validate(tiny_recipe_fields(ckpt, "both", tmp_path / "out"))
    checkpoint = sources.resolve_checkpoint(recipe)
    plain = sources.resolve_checkpoint(Recipe.model_validate(tiny_recipe_fields(tiny_checkpoint("llama"), "x", tmp_path / "o")))
    assert checkpoint.info.weights_sha256 == plain.info.weights_sha256  # the .bin files are not part of the weights
    assert sources.load_options(recipe) == {"trust_remote_code": False, "use_safetensors": True}

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **sources.load_options(recipe))  # no torch.load


def _pickle_adapter(tmp_path):
    """A one-module LoRA adapter for the tiny llama, saved as adapter_model.bin (a pickle)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.save({f"{module}.lora_A.weight": torch.randn(2, 64), f"{module}.lora_B.weight": torch.randn(64, 2)},
               adapter / "adapter_model.bin")
    return adapter


def test_pickle_adapter_needs_allow_pickle(tmp_path):
    adapter = _pickle_adapter(tmp_path)
    with pytest.raises(AdapterError, match="adapter_model.bin.*allow_pickle: true") as e:
        read_adapter(adapter)
    assert e.value.exit_code == 2
    assert read_adapter(adapter, allow_pickle=True).weights_file.name == "adapter_model.bin"


CUSTOM_CODE = {
    "configuration_custom.py": """
        from transformers import LlamaConfig

        class CustomConfig(LlamaConfig):
            model_type = "llama"
    """,
    "modeling_custom.py": """
        from transformers import LlamaForCausalLM

        from .configuration_custom import CustomConfig

        class CustomForCausalLM(LlamaForCausalLM):
            config_class = CustomConfig
    """,
}


@pytest.fixture
def custom_code_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny llama with an auto_map pointing at Python files shipped in the checkpoint."""
    ckpt = tmp_path / "custom"
    shutil.copytree(tiny_checkpoint("llama"), ckpt)
    for name, code in CUSTOM_CODE.items():
        (ckpt / name).write_text(textwrap.dedent(code))
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_checkpoint_code_needs_trust_remote_code(custom_code_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fields = tiny_recipe_fields(custom_code_checkpoint, "custom", out, targets=("onnx",))
    fields["validation"]["max_new_tokens"] = 4
    _fails(write_recipe(tmp_path / "r.yaml", **fields), out, "config.json", "ships its own Python code",
           "AutoModelForCausalLM", "trust_remote_code: true")

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # not the user's HF cache
    recipe = load_recipe(write_recipe(tmp_path / "ok.yaml", **fields, trust_remote_code=True))
    assert recipe.sha256() != Recipe.model_validate(fields).sha256()
    built = build(recipe)
    assert built.manifest.source.trust_remote_code is True and built.manifest.source.allow_pickle is None
    assert list((tmp_path / "hf-modules").rglob("modeling_custom.py"))  # the checkpoint's code was what ran
