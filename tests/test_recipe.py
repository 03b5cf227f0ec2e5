"""Bad recipes are clear errors that name the field (and line), exit non-zero, and write nothing."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, tiny_recipe_fields, write_recipe
from inferneo_build.recipe import RecipeError, load_recipe


def _cli_fails(recipe_path, out_dir, *needles, code=2):
    r = run_cli("build", str(recipe_path), "--json")
    assert r.returncode == code, r.stdout + r.stderr
    payload = json.loads(r.stdout)
    assert payload["ok"] is False
    for needle in needles:
        assert needle in payload["message"], payload["message"]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if "staging" in p.name]
    return payload


def test_unknown_field_names_field_and_line(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out)
    fields["targets"] = [{"format": "onnx", "opsett": 17}]
    path = write_recipe(tmp_path / "r.yaml", **fields)
    payload = _cli_fails(path, out, "targets.0.opsett", "unknown field")
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "opsett" in l)
    assert f"r.yaml:{line}:" in payload["message"]


def test_wrong_type(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "t", out,
                                                                   shapes={"max_batch": "four"}))
    _cli_fails(path, out, "shapes.max_batch", "integer")


def test_missing_source(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out)
    del fields["source"]
    _cli_fails(write_recipe(tmp_path / "r.yaml", **fields), out, "source", "required")


def test_missing_checkpoint_dir(tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tmp_path / "nope", "t", out))
    _cli_fails(path, out, "source.path", "nope")


def test_missing_gguf_file(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, source={"gguf": str(tmp_path / "x.gguf")})
    _cli_fails(write_recipe(tmp_path / "r.yaml", **fields), out, "source.gguf", "x.gguf")


def _bert_checkpoint(path, head: bool):
    """A tiny BERT (an encoder: bidirectional attention) with a tokenizer that fits its vocabulary."""
    from transformers import BertConfig, BertLMHeadModel, BertModel

    from tiny_models import _write_tokenizer

    config = BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    (BertLMHeadModel if head else BertModel)(config).save_pretrained(path)
    _write_tokenizer(path, 512)
    return path


def test_base_model_without_lm_head_is_refused_before_export(tmp_path):
    """transformers would fill the missing head with random values, and both sides of validation would agree."""
    ckpt = _bert_checkpoint(tmp_path / "bert", head=False)
    out = tmp_path / "out"
    _cli_fails(write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(ckpt, "t", out)), out,
               "'bert'", "BertLMHeadModel", "cls.predictions", "causal language model")


def test_unsupported_architecture(tmp_path):
    """A complete model that is not causal: the generic path's probe sees it and lists what is fused."""
    ckpt = _bert_checkpoint(tmp_path / "bert", head=True)
    out = tmp_path / "out"
    payload = _cli_fails(write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(ckpt, "t", out)), out,
                         "'bert'", "not causal")
    assert "llama" in payload["message"]  # lists what is supported


def test_tokenizer_of_another_model_is_refused(tmp_path, tiny_checkpoint):
    """A tokenizer with more tokens than the checkpoint embeds would crash the reference with an IndexError."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import TINY_CONFIGS

    fields = dict(TINY_CONFIGS["llama"], vocab_size=300)  # the tokenizer beside it has 512 tokens
    ckpt = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(ckpt)
    for f in tiny_checkpoint("llama").glob("*token*"):
        shutil.copy(f, ckpt / f.name)
    out = tmp_path / "out"
    _cli_fails(write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(ckpt, "t", out)), out,
               "validation prompt 2 encodes to token id", "300 entries", "another model")


def test_missing_recipe_file(tmp_path):
    r = run_cli("build", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2
    assert "absent.yaml" in r.stderr and "not found" in r.stderr


@pytest.mark.parametrize("text,needle", [
    ("name: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "YAML mapping"),
])
def test_malformed_yaml(tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=needle):
        load_recipe(path)


def test_bundled_recipe_is_valid():
    from conftest import REPO

    recipe = load_recipe(REPO / "recipes" / "smollm2-135m.yaml")
    assert [t.format for t in recipe.targets] == ["onnx", "torchscript"]
    assert recipe.source.tokenizer.eos_token == "<|im_end|>"
