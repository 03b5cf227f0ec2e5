"""A model's generation_config.json sampling fields are the server's defaults for requests that leave them unset
(as vLLM's --generation-config auto), --generation-config none restores OpenAI's; a request's own value wins.
Checked with seeded draws through the official openai client against real `inferneo serve` processes."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from conftest import free_port, serve_subprocess, tiny_recipe_fields  # noqa: E402
from inferneo_runtime.sampling_defaults import read_sampling_defaults  # noqa: E402

MODEL_DEFAULTS = {"temperature": 0.6, "top_k": 20, "max_new_tokens": 7, "do_sample": True}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    """A tiny llama whose checkpoint ships sampling defaults, as Qwen3's does."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    ckpt = tmp_path_factory.mktemp("ckpt") / "llama"
    shutil.copytree(tiny_checkpoint("llama"), ckpt)
    gen = ckpt / "generation_config.json"
    gen.write_text(json.dumps({**(json.loads(gen.read_text()) if gen.is_file() else {}), **MODEL_DEFAULTS}))
    out = tmp_path_factory.mktemp("art") / "tiny-defaults"
    return build(Recipe.model_validate(tiny_recipe_fields(ckpt, "tiny-defaults", out, targets=("onnx",)))).output


def _serve(artifact, tmp_path_factory, *flags):
    cwd = tmp_path_factory.mktemp("serve")
    port = free_port()
    return serve_subprocess([str(artifact), "--port", str(port), "--log-level", "info", *flags], cwd, port)


@pytest.fixture(scope="module")
def model_defaults(artifact, tmp_path_factory):
    with _serve(artifact, tmp_path_factory) as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60), s


@pytest.fixture(scope="module")
def api_defaults(artifact, tmp_path_factory):
    with _serve(artifact, tmp_path_factory, "--generation-config", "none") as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60)


def _draws(client, **fields) -> list[str]:
    """Six seeded completions (20 tokens each) with `fields` set and everything else left to the defaults."""
    fields = {"max_tokens": 20, "extra_body": {"ignore_eos": True}, **fields}
    return [client.completions.create(model="tiny-defaults", prompt=PROMPT, seed=seed, **fields).choices[0].text
            for seed in range(6)]


def test_unset_fields_take_the_models_generation_config(model_defaults):
    client, server = model_defaults
    unset = _draws(client)
    assert unset == _draws(client, temperature=0.6, extra_body={"top_k": 20, "ignore_eos": True})
    assert unset != _draws(client, temperature=1.0, extra_body={"top_k": 0, "ignore_eos": True})
    assert "temperature=0.6" in server.log.read_text()  # the server says where its defaults come from


def test_a_requests_own_values_win(model_defaults):
    client, _ = model_defaults
    mine = _draws(client, temperature=1.0, extra_body={"top_k": 0, "ignore_eos": True})
    assert mine == _draws(client, temperature=1.0, extra_body={"top_k": 0, "ignore_eos": True})
    assert mine != _draws(client)


def test_max_new_tokens_is_the_default_length(model_defaults):
    client, _ = model_defaults
    done = client.completions.create(model="tiny-defaults", prompt=PROMPT, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 7  # not OpenAI's 16
    chat = client.chat.completions.create(model="tiny-defaults", messages=[{"role": "user", "content": PROMPT}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 7 and chat.choices[0].finish_reason == "length"


def test_generation_config_none_keeps_openais_defaults(api_defaults, model_defaults):
    unset = _draws(api_defaults)
    assert unset == _draws(api_defaults, temperature=1.0, extra_body={"top_k": 0, "ignore_eos": True})
    assert unset != _draws(model_defaults[0])
    done = api_defaults.completions.create(model="tiny-defaults", prompt=PROMPT, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 16


def test_odd_values_are_left_out_by_name(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": -1, "top_p": 0.9, "top_k": 2.5, "repetition_penalty": True, "min_p": 0.05, "eos_token_id": 2}))
    with caplog.at_level(logging.WARNING, logger="inferneo"):
        assert read_sampling_defaults(tmp_path) == {"top_p": 0.9, "min_p": 0.05}
    assert "temperature=-1" in caplog.text and "top_k=2.5" in caplog.text and "repetition_penalty=True" in caplog.text
    (tmp_path / "generation_config.json").write_text("{not json")
    assert read_sampling_defaults(tmp_path) == {}
    assert read_sampling_defaults(tmp_path / "absent") == {}
