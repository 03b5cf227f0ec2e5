"""The embedding models people deploy in 2026, as tiny random checkpoints saved by sentence-transformers itself:
Qwen3-Embedding (a causal qwen3 decoder, last-token pooling over left-padded batches, an instruction prompt),
EmbeddingGemma (bidirectional gemma3_text, mean pooling, two Dense projections in the exported graph) and
ModernBERT (alternating local/global attention). Each artifact must equal `SentenceTransformer.encode` on the
same directory, in Python and through a served /v1/embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import inferneo_runtime
from conftest import run_cli
from inferneo_build import build
from test_encoders import cosine, encoder_recipe
from tiny_models import make_tiny_embedder

st = pytest.importorskip("sentence_transformers")

# different lengths in one batch (padding), one longer than max_seq_length 40 (truncation)
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer.",
         "Inferneo compiles models ahead of time and serves them with a KV cache. " * 3, "fox"]
QUERY = "Instruct: find the fox\nQuery: "


def _save_st(base: Path, out: Path, modules_after: list, prompts=None, default_prompt_name=None) -> Path:
    from sentence_transformers.models import Transformer

    modules = [Transformer(str(base), max_seq_length=40)] + modules_after
    st.SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                           device="cpu").save(str(out))
    return out


def _build(ckpt: Path, out: Path, targets=None):
    return build(encoder_recipe({"path": str(ckpt)}, out, targets=targets or [{"format": "onnx"},
                                                                                {"format": "torchscript"}]))


def _check(ckpt: Path, built, dim: int, texts=TEXTS):
    expected = st.SentenceTransformer(str(ckpt), device="cpu").encode(texts, convert_to_numpy=True)
    assert cosine(expected, expected[::-1]).min() < 0.99  # the texts really get different embeddings
    results = {}
    for target in built.manifest.valid_targets():
        with inferneo_runtime.load(built.output, target=target) as model:
            got = model.embed(texts)
            assert got.shape == (len(texts), dim), target
            results[target] = float(cosine(got, expected).min())
            assert results[target] >= 0.9999, (target, results[target])
            assert np.abs(got - expected).max() < 1e-3, target
            assert np.allclose(model.embed(texts, batch_size=1), got, atol=1e-4)  # unpadded: the same
            assert all(r["match"] for r in model.check_goldens())
    assert set(results) == {"onnx", "torchscript"}
    return expected


def _serve_and_compare(built, texts, expected, prompt_names: dict | None = None):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import socket
    import threading
    import time

    import uvicorn

    from inferneo_runtime.server.app import create_app
    from inferneo_runtime.server.config import ServerConfig
    from inferneo_runtime.server.lifecycle import build_registry

    config = ServerConfig(artifacts=[{"path": str(built.output)}], log_level="warning")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(build_registry(config), config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=30)
        got = client.embeddings.create(model=built.manifest.name, input=texts)
        vectors = np.array([d.embedding for d in got.data])
        assert cosine(vectors, expected).min() >= 0.9999
        for name, prompted in (prompt_names or {}).items():  # TEI's prompt_name, through extra_body
            got = client.embeddings.create(model=built.manifest.name, input=texts, extra_body={"prompt_name": name})
            assert cosine(np.array([d.embedding for d in got.data]), prompted).min() >= 0.9999
        if prompt_names:
            with pytest.raises(openai.BadRequestError, match="prompt_name 'passage' is not one of") as e:
                client.embeddings.create(model=built.manifest.name, input=texts, extra_body={"prompt_name": "passage"})
            assert e.value.body["param"] == "prompt_name"
    finally:
        server.should_exit = True
        thread.join(15)


def _cli_build(ckpt, tmp_path):
    """`inferneo build` of `ckpt` as a feature-extraction onnx artifact, through the CLI (its exit code, stderr)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "x", "task": "feature-extraction", "source": {"path": str(ckpt)},
                                  "targets": [{"format": "onnx"}], "validation": {"prompts": ["hi"]},
                                  "output": str(tmp_path / "out")}))
    return run_cli("build", str(recipe))


# -- 1. Qwen3-Embedding ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_embedding(tmp_path_factory):
    from sentence_transformers.models import Normalize, Pooling

    root = tmp_path_factory.mktemp("qwen3-emb")
    base = make_tiny_embedder("qwen3", root / "base", padding_side="left")
    ckpt = _save_st(base, root / "ckpt", [Pooling(64, pooling_mode="lasttoken"), Normalize()],
                    prompts={"query": QUERY, "document": ""}, default_prompt_name="query")
    return ckpt, _build(ckpt, root / "art")


def test_qwen3_embedding_equals_sentence_transformers(qwen3_embedding):
    ckpt, built = qwen3_embedding
    e = built.manifest.encoder
    assert (e.pooling, e.normalize, e.prompt, e.dim, e.max_length) == ("lasttoken", True, QUERY, 64, 40)
    assert built.manifest.model.model_type == "qwen3" and e.graph_modules is None
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["padding_side"] == "left"
    expected = _check(ckpt, built, 64)
    # the prompt is applied: without it sentence-transformers gives other vectors
    plain = st.SentenceTransformer(str(ckpt), device="cpu").encode(TEXTS, prompt="", convert_to_numpy=True)
    assert cosine(plain, expected).min() < 0.99
    with inferneo_runtime.load(built.output) as model:
        feeds = model.tokenize(TEXTS[:2])
        assert feeds["attention_mask"][0, 0] == 0 and feeds["attention_mask"][:, -1].all()  # left-padded
        # the named prompts, as encode(prompt_name=...): Qwen3-Embedding's documents take none
        assert e.prompts == {"query": QUERY, "document": ""}
        assert cosine(model.embed(TEXTS, prompt_name="document"), plain).min() >= 0.9999
        assert cosine(model.embed(TEXTS, prompt_name="query"), expected).min() >= 0.9999
        with pytest.raises(inferneo_runtime.InferneoError, match="prompt_name 'passage' is not one of"):
            model.embed(TEXTS, prompt_name="passage")


def test_qwen3_embedding_served(qwen3_embedding):
    ckpt, built = qwen3_embedding
    reference = st.SentenceTransformer(str(ckpt), device="cpu")
    _serve_and_compare(built, TEXTS, reference.encode(TEXTS),
                       prompt_names={"document": reference.encode(TEXTS, prompt_name="document")})


# -- 2. EmbeddingGemma -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedding_gemma(tmp_path_factory):
    import torch
    from sentence_transformers.models import Dense, Normalize, Pooling

    root = tmp_path_factory.mktemp("gemma-emb")
    base = make_tiny_embedder("gemma3_text", root / "base")
    torch.manual_seed(1)
    modules = [Pooling(64, pooling_mode="mean"),
               Dense(64, 256, bias=False, activation_function=torch.nn.Identity()),
               Dense(256, 48, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    ckpt = _save_st(base, root / "ckpt", modules, default_prompt_name="query",
                    prompts={"query": "task: search result | query: ", "document": "title: none | text: "})
    return ckpt, _build(ckpt, root / "art")


def test_embedding_gemma_equals_sentence_transformers(embedding_gemma):
    ckpt, built = embedding_gemma
    e = built.manifest.encoder
    assert (e.pooling, e.normalize, e.dim, e.prompt) == ("mean", True, 48, "task: search result | query: ")
    assert e.graph_modules == ["Pooling mean", "Dense 64->256 (identity, no bias)", "Dense 256->48 (identity, no bias)"]
    for name in ("onnx", "torchscript"):
        t = built.manifest.targets[name]
        assert [o.name for o in t.io.outputs] == ["sentence_embedding"] and t.io.outputs[0].shape == ["batch", 48]
    listed = {f.path for f in built.manifest.root_files}
    assert {"modules.json", "2_Dense/config.json", "3_Dense/config.json"} <= listed
    assert not any(p.endswith(".safetensors") for p in listed)  # the projections live in the graph
    _check(ckpt, built, 48)
    r = run_cli("validate", str(built.output), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr


def test_embedding_gemma_served(embedding_gemma):
    ckpt, built = embedding_gemma
    _serve_and_compare(built, TEXTS, st.SentenceTransformer(str(ckpt), device="cpu").encode(TEXTS))


def test_dense_with_tanh_and_bias(tmp_path):
    """A classic Dense (bias, Tanh: the sentence-transformers default) on a BERT-family encoder (ModernBERT)."""
    import torch
    from sentence_transformers.models import Dense, Pooling

    base = make_tiny_embedder("modernbert", tmp_path / "base")
    torch.manual_seed(2)
    ckpt = _save_st(base, tmp_path / "ckpt", [Pooling(64, pooling_mode="cls"), Dense(64, 16)])
    built = _build(ckpt, tmp_path / "art", targets=[{"format": "onnx"}, {"format": "torchscript"}])
    assert built.manifest.encoder.graph_modules == ["Pooling cls", "Dense 64->16 (tanh)"]
    assert not built.manifest.encoder.normalize
    _check(ckpt, built, 16)


def test_unsupported_dense_is_refused(embedding_gemma, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(embedding_gemma[0], ckpt)
    config = json.loads((ckpt / "2_Dense" / "config.json").read_text())
    (ckpt / "2_Dense" / "config.json").write_text(json.dumps(config | {"activation_function": "my.Act"}))
    r = _cli_build(ckpt, tmp_path)
    assert r.returncode == 2 and "2_Dense/config.json" in r.stderr and "'my.Act'" in r.stderr, r.stderr


# -- 3. ModernBERT ---------------------------------------------------------------------------------------------
def test_modernbert_equals_sentence_transformers(tmp_path):
    from sentence_transformers.models import Normalize, Pooling

    base = make_tiny_embedder("modernbert", tmp_path / "base")
    ckpt = _save_st(base, tmp_path / "ckpt", [Pooling(64, pooling_mode="mean"), Normalize()])
    built = _build(ckpt, tmp_path / "art")
    assert built.manifest.model.model_type == "modernbert" and built.manifest.encoder.pooling == "mean"
    _check(ckpt, built, 64)


def test_chat_template_formatting_is_refused(qwen3_embedding, tmp_path):
    """A tokenizer with a chat template: a checkpoint saved before sentence-transformers 5.7 (no modality_config,
    as Qwen3-Embedding's and EmbeddingGemma's) embeds plain texts and builds; one whose saved modality_config lists
    "message" has every text formatted with the chat template, which the artifact does not do: refused, exit 2."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_embedding[0], ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config | {
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"}))
    st_config = json.loads((ckpt / "sentence_bert_config.json").read_text())
    legacy = {k: v for k, v in st_config.items() if k not in ("modality_config", "module_output_name")}
    (ckpt / "sentence_bert_config.json").write_text(json.dumps(legacy | {"max_seq_length": 40}))
    built = _build(ckpt, tmp_path / "legacy", targets=[{"format": "onnx"}])
    expected = st.SentenceTransformer(str(ckpt), device="cpu").encode(TEXTS)
    with inferneo_runtime.load(built.output) as model:
        assert cosine(model.embed(TEXTS), expected).min() >= 0.9999

    modalities = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    modalities["message"] = modalities["text"] | {"format": "flat"}
    (ckpt / "sentence_bert_config.json").write_text(json.dumps(st_config | {"modality_config": modalities}))
    templated = st.SentenceTransformer(str(ckpt), device="cpu").encode(TEXTS)
    assert cosine(templated, expected).min() < 0.99  # sentence-transformers really formats them
    r = _cli_build(ckpt, tmp_path)
    assert r.returncode == 2 and "sentence_bert_config.json" in r.stderr and "chat template" in r.stderr, r.stderr


def test_modernbert_classifier_scores_as_the_pipeline(tmp_path):
    """ModernBERT's sequence-classification head (its own pooling, in the graph) scores as transformers' pipeline;
    the decoder backbones are embedders only."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    base = make_tiny_embedder("modernbert", tmp_path / "base")
    config = AutoConfig.from_pretrained(base, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.mul_(10.0)
    model.save_pretrained(tmp_path / "cls")
    for path in base.glob("*.json"):  # the tokenizer's files (transformers 5 writes no special_tokens_map.json)
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, tmp_path / "cls" / path.name)
    built = build(encoder_recipe({"path": str(tmp_path / "cls")}, tmp_path / "art", task="text-classification",
                                 targets=[{"format": "onnx"}]))
    expected = pipeline("text-classification", model=str(tmp_path / "cls"), device="cpu", top_k=None)(TEXTS)
    with inferneo_runtime.load(built.output) as model:
        got = model.classify(TEXTS)
    for g, e in zip(got, expected):
        assert g["label"] == e[0]["label"] and all(abs(g["scores"][d["label"]] - d["score"]) < 1e-5 for d in e)

    from inferneo_build.architectures import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="'qwen3' is supported for feature-extraction"):
        config = AutoConfig.for_model("qwen3", vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=16)
        from inferneo_build.encoder import encoder_spec

        encoder_spec(config, encoder_recipe({"path": str(base)}, tmp_path / "x", task="text-classification"), base)


def test_prompt_left_out_of_pooling_after_left_padding(tmp_path):
    """include_prompt false over a left-padded batch: the prompt's tokens follow each row's padding, and
    sentence-transformers leaves out both (Pooling._exclude_prompt_from_mask); mean pooling, a named prompt."""
    from sentence_transformers.models import Pooling

    base = make_tiny_embedder("qwen3", tmp_path / "base", padding_side="left")
    ckpt = _save_st(base, tmp_path / "ckpt", [Pooling(64, pooling_mode="mean", include_prompt=False)],
                    prompts={"query": QUERY})
    built = _build(ckpt, tmp_path / "art", targets=[{"format": "onnx"}])
    assert built.manifest.encoder.include_prompt is False and built.manifest.encoder.prompt is None
    model_st = st.SentenceTransformer(str(ckpt), device="cpu")
    texts = TEXTS[:4]  # "fox" merges with the prompt's trailing space: nothing left to pool, a zero vector in both
    expected = model_st.encode(texts, prompt_name="query")
    with inferneo_runtime.load(built.output) as model:
        got = model.embed(texts, prompt_name="query")
        assert cosine(got, expected).min() >= 0.9999 and np.abs(got - expected).max() < 1e-4
        assert cosine(model.embed(texts), model_st.encode(texts)).min() >= 0.9999
        assert cosine(got, model.embed(texts)).min() < 0.99  # the prompt really is there (in attention)
