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


def _broken_copy(tiny_checkpoint, tmp_path, name: str, content: bytes | None = None, truncate: int | None = None):
    """A copy of the tiny llama checkpoint with one file overwritten or truncated."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), ckpt)
    if content is not None:
        (ckpt / name).write_bytes(content)
    if truncate is not None:
        with open(ckpt / name, "r+b") as f:
            f.truncate(truncate)
    return ckpt


@pytest.mark.parametrize("truncate,content", [(1000, None), (None, b"garbage\n"), ("half", None)])
def test_truncated_or_corrupt_safetensors_is_named(tmp_path, tiny_checkpoint, truncate, content):
    """safetensors' own error ("Error while deserializing header") named no file and exited 1."""
    if truncate == "half":  # the header intact, the data cut short
        truncate = (tiny_checkpoint("llama") / "model.safetensors").stat().st_size // 2
    ckpt = _broken_copy(tiny_checkpoint, tmp_path, "model.safetensors", content, truncate)
    out = tmp_path / "out"
    _cli_fails(write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(ckpt, "t", out)), out,
               str(ckpt / "model.safetensors"), "not a readable safetensors file")


@pytest.mark.parametrize("content,needle", [(b"name: not a gguf\n", "is not a GGUF file"), (b"", "is not a GGUF file"),
                                            (b"GGUF\x03\x00\x00\x00" + b"\x05" + b"\x00" * 7 + b"\x02" + b"\x00" * 7
                                             + b"\x01\x02", "cannot convert")])
def test_a_file_that_is_not_a_gguf_is_named(tmp_path, tiny_checkpoint, content, needle):
    """gguf's reader raised a bare ValueError ("GGUF magic invalid"): no file named, exit 1."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, source={"gguf": str(gguf)})
    _cli_fails(write_recipe(tmp_path / "r.yaml", **fields), out, "source.gguf", str(gguf), needle)


@pytest.mark.parametrize("name,content", [("generation_config.json", b"{bad"), ("tokenizer_config.json", b"[1, 2]"),
                                          ("tokenizer.json", b"{bad"), ("tokenizer.json", b'{"model": 1}')])
def test_unreadable_checkpoint_json_is_named(tmp_path, tiny_checkpoint, name, content):
    """A broken generation_config.json exited 1 with a bare JSONDecodeError; a broken tokenizer.json exited 3 ("bad
    manifest") naming the build's staging copy, a directory that no longer exists when the user reads it."""
    ckpt = _broken_copy(tiny_checkpoint, tmp_path, name, content)
    out = tmp_path / "out"
    payload = _cli_fails(write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(ckpt, "t", out)), out,
                         str(ckpt / name))
    assert "staging" not in payload["message"]


@pytest.mark.parametrize("field", ["bos_token", "eos_token"])
def test_tokenizer_override_with_an_unknown_token_is_named(tmp_path, tiny_checkpoint, field):
    """bos_token + add_bos_token with a token the tokenizer lacks crashed with KeyError (exit 1); an unknown eos_token
    was written to tokenizer_config.json while generation kept the old end-of-sequence id."""
    out = tmp_path / "out"
    tokenizer = {field: "<nope>", **({"add_bos_token": True} if field == "bos_token" else {})}
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out,
                                source={"path": str(tiny_checkpoint("llama")), "tokenizer": tokenizer})
    _cli_fails(write_recipe(tmp_path / "r.yaml", **fields), out, f"source.tokenizer.{field}", "'<nope>'")


def test_max_sequence_beyond_the_model_is_bad_input(tmp_path, tiny_checkpoint):
    """A recipe asking for more positions than the model has exited 1 ("unexpected error"), not 2."""
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out, shapes={"max_batch": 2, "max_sequence": 4096})
    _cli_fails(write_recipe(tmp_path / "r.yaml", **fields), out, "shapes.max_sequence 4096", "512")


def test_a_prompt_that_encodes_to_nothing_is_named(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "t", out,
                                validation={"prompts": ["hello", ""], "max_new_tokens": 4})
    _cli_fails(write_recipe(tmp_path / "r.yaml", **fields), out, "validation.prompts.1", "no tokens")
