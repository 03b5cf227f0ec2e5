"""The runtime's tokenizer (tokenizers alone) against transformers' own, on the artifact a build writes.

Small real tokenizers in the styles of Llama 3 (byte-level BPE, BOS from the post-processor, clean-up on),
Llama 2 (SentencePiece BPE with byte fallback, BOS from tokenizer_config.json's add_bos_token) and T5/Gemma-like
Unigram with Metaspace, trained in a second, wrapped in transformers' classes and saved as a checkpoint. The
reference is whatever transformers this interpreter has (CI runs this file under both majors).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from inferneo_build.recipe import TokenizerOverrides
from inferneo_build.source import Checkpoint, SourceError, copy_root_files
from inferneo_runtime.detokenize import StopStringDetokenizer
from inferneo_runtime.manifest import SourceInfo
from inferneo_runtime.tokenizer import Tokenizer

CORPUS = ["Hello world. I don't know, do you? It's fine! We're here, aren't we? I'm sure they've gone.",
          "héllo wörld 中文字符 日本語のテキスト 🤖🎉 emoji ünïcödé", "The quick brown fox jumps over the lazy dog.",
          "def f(x):\n    return x != 2  # a comment", "spaces   here , and there . Yes ! Why ?"] * 10
TEXTS = ["Hello world .", "I do n't know , do you ? It 's fine !", "héllo 中文 🤖 and 日本", "  two  spaces\n\nnew",
         "<s>[INST] hi [INST]there<mid>x</s> after", "<|begin_of_text|>a<tool> b<|eot_id|>c", "x != y", ""]


def _llama3(tmp: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer as Raw, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Raw(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.add_tokens([AddedToken("<tool>", normalized=False)])  # added, not special: kept by skip_special_tokens
    # Meta's Llama 3 configs say clean_up_tokenization_spaces: true
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            clean_up_tokenization_spaces=True).save_pretrained(tmp)
    return tmp


def _llama2(tmp: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer as Raw, decoders, models, normalizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Raw(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([t.replace(" ", "▁") for t in CORPUS], trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))],
        show_progress=False))
    tok.add_tokens([AddedToken("[INST]", normalized=False, lstrip=True, rstrip=True)])
    tok.add_special_tokens([AddedToken("<mid>", normalized=False)])
    LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True,
                       add_bos_token=True).save_pretrained(tmp)
    # BOS comes from tokenizer_config.json's add_bos_token alone, which transformers' Llama class reads
    data = json.loads((tmp / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp / "tokenizer.json").write_text(json.dumps(data))
    return tmp


def _unigram(tmp: Path) -> Path:
    from tokenizers import Tokenizer as Raw, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Raw(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            clean_up_tokenization_spaces=True).save_pretrained(tmp)
    return tmp


STYLES = {"llama3": _llama3, "llama2": _llama2, "unigram": _unigram}


def _artifact_tokenizer(src: Path, dest: Path, **overrides) -> Path:
    """The tokenizer files as a build writes them into an artifact."""
    (src / "config.json").write_text('{"model_type": "llama"}')
    dest.mkdir()
    info = SourceInfo(kind="path", uri=str(src), weights_sha256="0" * 64)
    copy_root_files(Checkpoint(directory=src, info=info, tokenizer=TokenizerOverrides(**overrides)), dest)
    return dest


@pytest.fixture(scope="module", params=sorted(STYLES))
def pair(request, tmp_path_factory):
    """(transformers' tokenizer of the checkpoint, the runtime's of the artifact built from it)."""
    from transformers import AutoTokenizer

    src = STYLES[request.param](tmp_path_factory.mktemp(f"ckpt-{request.param}"))
    hf = AutoTokenizer.from_pretrained(src)
    return hf, Tokenizer(_artifact_tokenizer(src, tmp_path_factory.mktemp("artifact") / "a"))


def test_encode_matches_transformers(pair):
    hf, ours = pair
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (text, add)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)


def _stream(ours: Tokenizer, prompt: list[int], ids: list[int], **kw) -> tuple[str, str]:
    d = StopStringDetokenizer(ours, prompt, **kw)
    streamed = "".join(d.push(t) for t in ids if not d.stopped) + d.finish()
    return streamed, d.text


def test_decode_and_stream_match_transformers(pair):
    """Random ids (special ones, SentencePiece byte tokens, byte-level pieces of characters): decode, and the
    streamed pieces joined, are transformers' decode of the same ids."""
    hf, ours = pair
    rng = random.Random(0)
    cleans = _cleans_up(hf)
    vocab = len(hf)
    plain = [i for i in range(vocab) if i not in hf.all_special_ids]
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 16))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == _decode(hf, ids, skip), ids
        ref = _decode(hf, ids)
        streamed, text = _stream(ours, [], ids)
        assert streamed == text == ref, ids
        # after a prompt, the output is the text its ids add to the prompt's (transformers' text-generation
        # pipeline; vLLM): a SentencePiece leading space is kept
        prompt = hf.encode(rng.choice(TEXTS[:4]))[-3:]
        raw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
        added = hf.decode(prompt + ids, **raw)[len(hf.decode(prompt, **raw)):]
        assert _stream(ours, prompt, ids)[0] == (hf.clean_up_tokenization(added) if cleans else added), (prompt, ids)
        # a stop string spanning tokens (taken from text that follows a plain prefix)
        stop_ids = [rng.choice(plain) for _ in range(3)] + ids
        full = _decode(hf, stop_ids)
        if len(full) > 3 and "\ufffd" not in full:
            at = rng.randrange(1, len(full) - 2)
            stop = full[at:at + 3]
            assert _stream(ours, [], stop_ids, stop=[stop])[0] == full[:full.index(stop)], (stop_ids, stop)
            assert _stream(ours, [], stop_ids, stop=[stop], include_stop=True)[1] == full[:full.index(stop) + 3]


def test_clean_up_is_what_transformers_5_does(pair):
    """clean_up_tokenization_spaces: " ." is cleaned up where the tokenizer asks, except for BPE models, as in
    transformers 5 (transformers 4 also cleaned BPE text up, turning code's "a != b" into "a!= b")."""
    hf, ours = pair
    ids = hf.encode("Wait . Is it ? I do n't know , really ! a != b", add_special_tokens=False)
    assert ours.decode(ids) == _decode(hf, ids)
    assert _stream(ours, [], ids)[0] == _decode(hf, ids)
    assert ("a != b" in ours.decode(ids)) == (not _cleans_up(hf)), ours.decode(ids)


@pytest.mark.parametrize("style", ["llama3", "unigram"])
def test_an_artifact_config_asking_for_clean_up_is_read_as_transformers_5(style, tmp_path):
    """An artifact built before builds wrote the rule keeps the checkpoint's `clean_up_tokenization_spaces: true`:
    the runtime still leaves a BPE model's text alone and cleans a Unigram model's up."""
    artifact = _artifact_tokenizer(STYLES[style](tmp_path / "ckpt"), tmp_path / "artifact")
    config = json.loads((artifact / "tokenizer_config.json").read_text())
    (artifact / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ours = Tokenizer(artifact)
    text = ours.decode(ours.encode("Wait . a != b", add_special_tokens=False))
    assert ("Wait." in text) == (style == "unigram"), text


def _cleans_up(hf) -> bool:
    """Whether transformers 5 cleans this tokenizer's decoded spaces up: where its config asks, never for BPE."""
    return bool(hf.clean_up_tokenization_spaces) and type(hf.backend_tokenizer.model).__name__ != "BPE"


def _decode(hf, ids, skip: bool = True) -> str:
    return hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=_cleans_up(hf))


def test_recipe_add_bos_token_without_bos_token(tmp_path):
    """`add_bos_token: true` alone prepends the checkpoint's own BOS, also for a class that reads no add_bos_token."""
    src = _llama3(tmp_path / "ckpt")
    data = json.loads((src / "tokenizer.json").read_text())
    data["post_processor"] = None
    (src / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer(_artifact_tokenizer(src, tmp_path / "artifact", add_bos_token=True))
    assert ours.encode("Hello")[0] == ours.bos_id is not None


def test_split_special_tokens_is_refused(tmp_path):
    src = _llama3(tmp_path / "ckpt")
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    with pytest.raises(SourceError, match=r"tokenizer_config.json: split_special_tokens=true") as e:
        _artifact_tokenizer(src, tmp_path / "artifact")
    assert e.value.exit_code == 2


def test_file_truncation_is_not_applied(tmp_path):
    """A tokenizer.json saved with truncation (max_length 512, say) does not cut prompts: transformers encodes
    without it unless a call asks."""
    from transformers import AutoTokenizer

    src = _llama3(tmp_path / "ckpt")
    data = json.loads((src / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (src / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer(_artifact_tokenizer(src, tmp_path / "artifact"))
    text = "The quick brown fox jumps over the lazy dog."
    assert ours.encode(text) == AutoTokenizer.from_pretrained(src).encode(text) and len(ours.encode(text)) > 4


def test_named_chat_templates(tmp_path):
    """tokenizer_config.json's list of named templates: "default", and "tool_use" when the request has tools."""
    from transformers import AutoTokenizer

    src = _llama3(tmp_path / "ckpt")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"},
        {"name": "tool_use",
         "template": "{{ tools | length }} tools{% for m in messages %}|{{ m.content }}{% endfor %}"}]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(src)
    ours = Tokenizer(_artifact_tokenizer(src, tmp_path / "artifact"))
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert (ours.apply_chat_template(messages, template_kwargs={"tools": tools})
            == hf.apply_chat_template(messages, tools=tools, tokenize=False))
