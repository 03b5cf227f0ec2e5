"""The real model: the bundled SmolLM2-135M recipe (GGUF → HF → ONNX + TorchScript), built once per session."""
from __future__ import annotations

import json

import pytest
import torch

import inferneo_runtime
from conftest import REPO, run_cli
from inferneo_runtime.generation import GenerationParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    from inferneo_build import load_recipe
    from inferneo_build.source import resolve_checkpoint as resolve

    checkpoint = resolve(load_recipe(REPO / "recipes" / "smollm2-135m.yaml"))  # the cached conversion
    return AutoModelForCausalLM.from_pretrained(checkpoint.directory, dtype=torch.float32).eval()


def test_manifest_records_validation(smollm2_artifact):
    m = json.loads((smollm2_artifact / "inferneo.json").read_text())
    assert m["source"]["kind"] == "gguf" and len(m["source"]["weights_sha256"]) == 64
    assert m["generation"]["eos_token_ids"] == [2]
    for name in ("onnx", "torchscript"):
        v = m["targets"][name]["validation"]
        assert v["status"] == "passed" and v["token_match"] and v["prompts"] == 3 and v["new_tokens"] == 32
    assert not (smollm2_artifact / "tokenizer.model").exists()  # the 98 MB GGUF copy is not shipped


def test_tokenizer_is_fixed(smollm2_artifact):
    from transformers import AutoTokenizer

    with inferneo_runtime.load(smollm2_artifact) as model:
        ids = model.tokenizer.encode("Hello world")
        assert ids[0] != 1  # no <|im_start|> prepended to plain text
        assert model.eos_ids == [2] and model.tokenizer.eos_token == "<|im_end|>"
    hf = AutoTokenizer.from_pretrained(smollm2_artifact)  # transformers reads the fixed files the same way
    assert hf("Hello world").input_ids == ids and hf.eos_token_id == 2


@pytest.mark.parametrize("target", ["onnx", "torchscript"])
def test_greedy_equals_transformers(target, smollm2_artifact, hf_model):
    with inferneo_runtime.load(smollm2_artifact, target=target) as model:
        for prompt in PROMPTS:
            ids = model.tokenizer.encode(prompt)
            ours = model.generate_ids([ids], GenerationParams(max_new_tokens=32, ignore_eos=True))[0].token_ids
            hf_model.generation_config.eos_token_id = None  # all 32 steps, as ignore_eos does
            with torch.inference_mode():
                ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=32, pad_token_id=2)
            assert ours == ref[0, len(ids):].tolist(), (target, prompt)


def test_generate_cli_says_paris(smollm2_artifact):
    r = run_cli("generate", str(smollm2_artifact), "The capital of France is", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]


def test_validate_cli(smollm2_artifact):
    r = run_cli("validate", str(smollm2_artifact), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(t["status"] == "passed" for t in json.loads(r.stdout)["targets"].values())


def test_chat_template_matches_transformers(smollm2_artifact):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_artifact)
    conversations = [
        [{"role": "user", "content": "What is the tallest mountain?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本の首都は？ 🗻"}],
    ]
    with inferneo_runtime.load(smollm2_artifact) as model:
        for messages in conversations:
            ours = model.tokenizer.encode_chat(messages)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(theirs, "keys"):  # transformers 5 returns a BatchEncoding
                theirs = theirs["input_ids"]
            assert ours == list(theirs)


@pytest.mark.parametrize("target", ["onnx", "torchscript"])
def test_batch_of_four_equals_alone(target, smollm2_artifact):
    prompts = ["Hi", PROMPTS[0], PROMPTS[2], "Write a haiku about the sea and the wind in autumn:"]
    with inferneo_runtime.load(smollm2_artifact, target=target) as model:
        batched = model.generate(prompts, max_new_tokens=16)
        for p, b in zip(prompts, batched):
            assert b.token_ids == model.generate(p, max_new_tokens=16).token_ids, p


def test_streaming_emoji_and_cjk(smollm2_artifact):
    with inferneo_runtime.load(smollm2_artifact) as model:
        # the detokenizer on real multi-byte text: byte-level tokens split characters across tokens
        text = "Emoji 🎉🧑‍🚀 and CJK 東京タワー, 北京 — café"
        from inferneo_runtime.detokenize import StopStringDetokenizer

        ids = model.tokenizer.encode(text)
        d = StopStringDetokenizer(model.tokenizer, [], ())
        pieces = [d.push(t) for t in ids] + [d.finish()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        # and through the model, with sampling so the output wanders into multi-byte text
        kw = dict(max_new_tokens=40, temperature=1.0, seed=3)
        prompt = [{"role": "user", "content": "Reply only with emoji and Chinese characters: 🎉 你好"}]
        deltas = list(model.stream(prompt, **kw))
        full = model.chat(prompt, **kw)
        assert "".join(deltas) == full.text == model.tokenizer.decode(full.token_ids)
        assert not any("\ufffd" in d for d in deltas)
