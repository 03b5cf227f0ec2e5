"""RoPE settings read under whichever transformers major is installed (CI runs this under 4.57 and 5.x): the
frequencies equal the ones the transformers model itself uses, and a scaled-RoPE checkpoint builds to the same
greedy tokens as transformers."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import inferneo_runtime
from conftest import PROMPTS, tiny_recipe_fields
from inferneo_build.architectures import UnsupportedArchitecture, decoder_spec
from inferneo_build.rope_config import RopeConfigError, rope_config, rope_frequencies
from inferneo_runtime.generation import GenerationParams

DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=5000.0, bos_token_id=1, eos_token_id=2)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                 "long_factor": [2.0 + i / 4 for i in range(8)], "factor": 4.0,
                 "original_max_position_embeddings": 128},
}


def _llama_config(scaling):
    from transformers import LlamaConfig

    return LlamaConfig(**DIMS, rope_scaling=scaling)


@pytest.mark.parametrize("rope_type", list(SCALINGS))
def test_frequencies_equal_the_transformers_rotary_module(rope_type):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _llama_config(SCALINGS[rope_type])
    rope = rope_config(config)
    assert rope.rope_type == rope_type and rope.theta == 5000.0
    inv_freq, scaling = rope_frequencies(config)
    reference = LlamaRotaryEmbedding(config)
    assert torch.equal(torch.tensor(inv_freq, dtype=torch.float32), reference.inv_freq)
    assert scaling == pytest.approx(float(reference.attention_scaling))
    if rope_type == "yarn":
        assert scaling > 1.0  # the cos/sin scaling is carried, not dropped


def test_partial_rotary_factor_is_read():
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = AutoConfig.for_model("phi3", hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5)
    inv_freq, _ = rope_frequencies(config)
    assert len(inv_freq) == 4  # a quarter of head_dim 16: half of the rotated dims
    assert torch.equal(torch.tensor(inv_freq, dtype=torch.float32), Phi3RotaryEmbedding(config).inv_freq)


def test_dynamic_and_unknown_types_are_refused_by_name():
    with pytest.raises(UnsupportedArchitecture, match="'dynamic' depends on the sequence length"):
        decoder_spec(_llama_config({"rope_type": "dynamic", "factor": 2.0}))
    transformers5_shape = SimpleNamespace(model_type="llama", rope_parameters={"rope_type": "su", "rope_theta": 1e4})
    with pytest.raises(RopeConfigError, match="'su' is not supported.*supported: default, linear"):
        rope_config(transformers5_shape)


def test_both_majors_config_shapes_read_the_same():
    # transformers 4: rope_theta + rope_scaling; transformers 5: everything in rope_parameters, maybe per layer type
    v4 = SimpleNamespace(model_type="x", rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0})
    v5 = SimpleNamespace(model_type="x", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6})
    per_layer = SimpleNamespace(model_type="x", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    assert rope_config(v4) == rope_config(v5) == rope_config(per_layer, "full_attention")
    assert rope_config(per_layer, "sliding_attention").theta == 1e4
    with pytest.raises(RopeConfigError, match="differs per layer type"):
        rope_config(per_layer)
    plain5 = SimpleNamespace(model_type="x", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    plain4 = SimpleNamespace(model_type="x", rope_theta=1e4, rope_scaling=None)
    assert rope_config(plain5) == rope_config(plain4)


def test_scaled_rope_checkpoint_builds_to_transformers_tokens(tmp_path):
    from test_build_tiny import _hf_greedy
    from tiny_models import _write_tokenizer
    from transformers import AutoModelForCausalLM

    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    config = _llama_config(SCALINGS["yarn"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    _write_tokenizer(checkpoint, config.vocab_size)
    recipe = Recipe.model_validate(tiny_recipe_fields(checkpoint, "tiny-yarn", tmp_path / "art", targets=("onnx",)))
    artifact = build(recipe).output
    with inferneo_runtime.load(artifact) as loaded:
        for prompt in PROMPTS:
            ids = loaded.tokenizer.encode(prompt)
            out = loaded.generate_ids([ids], GenerationParams(max_new_tokens=12, ignore_eos=True))[0]
            assert out.token_ids == _hf_greedy(checkpoint, ids, 12), prompt
