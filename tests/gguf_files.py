"""Real GGUF files for the tests, written the way llama.cpp's convert_hf_to_gguf.py writes them: a tiny random
checkpoint's weights under GGUF tensor names (llama's q/k rows permuted, Gemma's norms stored as 1 + w), the
architecture and tokenizer metadata transformers' GGUF loader reads, tensors in a mix of types.

The `gguf` package quantizes the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) but only de-quantizes the k-quants,
so Q4_K and Q6_K are packed here (a simple llama.cpp-like rounding, not its search) and checked against
`gguf.quants.dequantize`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from gguf import GGMLQuantizationType as T

F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0,
                                                           T.Q5_1, T.Q4_K, T.Q6_K)

# Which type each 2-D tensor gets, by its GGUF role (`blk.0.attn_v.weight` -> "attn_v"); "*" for the rest.
# Q4_K_M as llama.cpp mixes it: Q4_K, with attn_v, ffn_down and the output head in Q6_K. Needs rows of 256.
Q4_K_M = {"*": Q4_K, "attn_v": Q6_K, "ffn_down": Q6_K, "output": Q6_K, "token_embd": Q6_K}
# The legacy block types and the float ones, one file (rows of 32 suffice)
LEGACY = {"*": Q4_0, "token_embd": Q8_0, "attn_v": Q8_0, "attn_output": F16, "ffn_up": Q5_0, "ffn_down": Q5_1,
          "ffn_gate": Q4_1, "output": Q8_0}
ALL_BF16 = {"*": BF16}

# family -> its GGUF architecture, tokenizer (special tokens first, BOS / EOS ids, tokenizer.ggml.pre,
# add_bos_token; byte-level BPE unless `spm`) and the HF config the random weights come from
FAMILIES = {
    "llama": dict(arch="llama", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], bos=0, eos=2,
                  pre="llama-bpe", add_bos=True,
                  config=dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": dict(arch="qwen2", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=0, eos=2,
                  pre="qwen2", add_bos=False,
                  config=dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True)),
    # llama.cpp writes Mistral as "llama"; transformers reads it as Mistral only where general.name is exactly
    # "mistral" (it tests `"mistral" in [name]`), so a real file ("Mistral 7B Instruct v0.3") loads as Llama: the same
    # network without a sliding window
    "mistral": dict(arch="llama", name="Mistral 7B Instruct", loads_as="llama", specials=["<unk>", "<s>", "</s>"],
                    bos=1, eos=2, pre="default", add_bos=True,
                    config=dict(model_type="mistral", num_key_value_heads=1, tie_word_embeddings=False)),
    # sentencepiece vocabulary (tokenizer.ggml.model "llama": scores, byte tokens), norms stored as 1 + w, a
    # sliding window shorter than the tests' sequences
    "gemma2": dict(arch="gemma2", specials=["<pad>", "<eos>", "<bos>", "<unk>"], bos=2, eos=1, unk=3, pad=0,
                   add_bos=True, spm=True, embed_at_init=True, norm_noise=0.5,
                   config=dict(model_type="gemma2", head_dim=32, num_key_value_heads=2, sliding_window=6,
                               tie_word_embeddings=True)),
}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello world, this is a tiny tokenizer.",
          "Inferneo compiles models ahead of time and serves them with a KV cache."] * 50


def write_gguf(path: Path, family: str, types: dict, *, hidden: int = 64, intermediate: int = 128,
               vocab: int = 512, layers: int = 2, seed: int = 0, tokenizer: bool = True,
               arch: Optional[str] = None, reference: Optional[Path] = None) -> Path:
    """A GGUF of a tiny random `family` model; `types` maps tensor roles to ggml types (see Q4_K_M). `tokenizer`:
    False writes no tokenizer metadata; `arch` overrides general.architecture. `reference`: where to save the
    HF model with the weights the file holds (de-quantized), the ground truth of a conversion."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = FAMILIES[family]
    heads = 4
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
               bos_token_id=fam["bos"], eos_token_id=fam["eos"]) | fam["config"]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # widen the random init so greedy text is varied, not one repeated token
        for name, p in model.named_parameters():
            if p.dim() < 2:
                p.add_(torch.randn_like(p) * fam.get("norm_noise", 0.3))
            elif not (fam.get("embed_at_init") and "embed" in name):  # Gemma's tied embedding, scaled by
                p.mul_(5.0)  # sqrt(hidden) on input, at init scale: else the residual stream echoes the input token
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}

    arch_name = arch or fam["arch"]
    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_name(fam.get("name", f"tiny-{family}"))
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if fam["arch"] == "gemma2":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(config.sliding_window)
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    if tokenizer:
        (_add_spm_tokenizer if fam.get("spm") else _add_tokenizer)(w, fam, vocab)

    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam["arch"]), layers)
    held = {}
    for hf_name, value in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        permuted = fam["arch"] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight"))
        n = heads if "attn_q" in name else config.num_key_value_heads
        if permuted:  # llama.cpp's permute: rotary pairs interleaved per head (transformers' loader undoes it)
            value = value.reshape(n, 2, value.shape[0] // n // 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        offset = 1.0 if fam["arch"] == "gemma2" and name.endswith("norm.weight") else 0.0  # Gemma scales by 1 + w,
        value = value + offset  # which llama.cpp stores
        role = name.split(".")[-2]
        qtype = F32 if value.ndim == 1 else types.get(role, types["*"])
        stored = _add_tensor(w, name, np.ascontiguousarray(value), qtype) - offset
        if permuted:  # blocks run along rows, so the rows' order back is the HF weight as the file holds it
            stored = stored.reshape(n, stored.shape[0] // n // 2, 2, *stored.shape[1:]).swapaxes(1, 2).reshape(
                stored.shape)
        held[hf_name] = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if Q4_K in types.values() else gguf.LlamaFileType.ALL_F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if reference is not None:
        model.load_state_dict(held, strict=False)  # a tied head follows the embedding
        model.save_pretrained(reference)
    return Path(path)


def _add_tokenizer(w, fam: dict, vocab: int) -> None:
    """A byte-level BPE (tokenizer.ggml.model "gpt2", as Llama 3 and Qwen GGUFs carry), padded to `vocab`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=fam["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    tokens += [f"<|reserved_{i}|>" for i in range(vocab - len(tokens))]
    specials = set(fam["specials"]) | {t for t in tokens if t.startswith("<|reserved_")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fam["pre"])
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(fam["bos"])
    w.add_eos_token_id(fam["eos"])
    w.add_add_bos_token(fam["add_bos"])
    w.add_chat_template(CHAT_TEMPLATE)


def _add_spm_tokenizer(w, fam: dict, vocab: int) -> None:
    """A sentencepiece-style vocabulary as Gemma GGUFs carry it: specials, the 256 byte tokens, then "▁"-prefixed
    pieces (a BPE trained here) with decreasing scores; no merges (transformers derives them)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab - 260, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    pieces = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    tokens = fam["specials"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens))]
    types = [3] * len(fam["specials"]) + [6] * 256 + [1] * len(pieces) + [5] * (vocab - 260 - len(pieces))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 260 + [-float(i) for i in range(vocab - 260)])
    w.add_token_types(types)
    w.add_bos_token_id(fam["bos"])
    w.add_eos_token_id(fam["eos"])
    w.add_unk_token_id(fam["unk"])
    w.add_pad_token_id(fam["pad"])
    w.add_add_bos_token(fam["add_bos"])
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _add_tensor(w, name: str, value: np.ndarray, qtype) -> np.ndarray:
    """Add `value` as `qtype`; returns what the file holds, de-quantized."""
    from gguf import quants

    if qtype == F32:
        w.add_tensor(name, value.astype(np.float32))
        return value.astype(np.float32)
    if qtype == F16:
        w.add_tensor(name, value.astype(np.float16))
        return value.astype(np.float16).astype(np.float32)
    packed = {Q4_K: pack_q4_k, Q6_K: pack_q6_k}.get(qtype, lambda v: _quantize(v, qtype))(value)
    w.add_tensor(name, packed, raw_dtype=qtype)
    try:
        return quants.dequantize(packed, qtype)
    except NotImplementedError:  # the error tests' Q8_1 zeros
        return np.zeros_like(value)


def _quantize(value: np.ndarray, qtype) -> np.ndarray:
    """gguf's own quantizer; for a type it has none for (the error tests' Q8_1), zero blocks of the right size."""
    from gguf import GGML_QUANT_SIZES, quants

    try:
        return quants.quantize(value, qtype)
    except NotImplementedError:
        block, size = GGML_QUANT_SIZES[qtype]
        return np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def pack_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> Q4_K bytes [rows, cols / 256 * 144]: per 256 values an fp16 scale d and min dmin,
    8 sub-blocks of 32 with 6-bit scale sc and min m; w = d * sc * q - dmin * m, q in 0..15."""
    from gguf import quants

    rows = x.shape[0]
    b = x.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(b.min(-1), 0.0)  # the min is subtracted as a non-negative m
    scale = (b.max(-1) - lo) / 15
    d = _f16(np.maximum(scale.max(-1), 1e-12) / 63)
    dmin = _f16(np.maximum((-lo).max(-1), 1e-12) / 63)
    sc = np.clip(np.ceil(scale / d[:, None]), 1, 63).astype(np.uint8)  # ceil: the sub-block's range fits
    m = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    step, offset = (d[:, None] * sc), (dmin[:, None] * m)
    q = np.clip(np.round((b + offset[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    scales = np.empty((b.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # byte 32i+k: sub-block 2i low, 2i+1 high nibble
    out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                          dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    out = out.reshape(rows, -1)
    expected = (step[..., None] * q - offset[..., None]).reshape(x.shape)
    assert np.allclose(quants.dequantize(out, Q4_K), expected, rtol=0, atol=1e-6 * np.abs(x).max())
    return out


def pack_q6_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> Q6_K bytes [rows, cols / 256 * 210]: per 256 values an fp16 d and 16 int8 scales
    (one per 16 values); w = d * sc * (q - 32), q in 0..63."""
    from gguf import quants

    rows = x.shape[0]
    b = x.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(b).max(-1) / 31
    d = _f16(np.maximum(scale.max(-1), 1e-12) / 127)
    sc = np.clip(np.ceil(scale / d[:, None]), 1, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.round(b / step[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    # value p = h*128 + s*64 + k: ql byte h*64 + k, nibble s; p = h*128 + s*32 + k: qh byte h*32 + k, bits 2s
    qh4 = q.reshape(-1, 2, 4, 32) >> 4
    ql = q.reshape(-1, 2, 2, 64) & 0x0F
    ql_bytes = (ql[:, :, 0] | (ql[:, :, 1] << 4)).reshape(-1, 128)
    qh_bytes = (qh4[:, :, 0] | (qh4[:, :, 1] << 2) | (qh4[:, :, 2] << 4) | (qh4[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql_bytes, qh_bytes, sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(-1, 2)],
                         axis=1).reshape(rows, -1)
    expected = (step[..., None] * (q.reshape(-1, 16, 16).astype(np.float32) - 32)).reshape(x.shape)
    assert np.allclose(quants.dequantize(out, Q6_K), expected, rtol=0, atol=1e-6 * np.abs(x).max())
    return out
