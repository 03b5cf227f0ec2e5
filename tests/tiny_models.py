"""Tiny random-weight checkpoints (seconds to build) for the fast tests."""
from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "mistral": dict(model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, sliding_window=None,
                    bos_token_id=1, eos_token_id=2),
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                 bos_token_id=1, eos_token_id=2),
}

# The families of issue 21, each with awkward shapes: head_dim != hidden / heads, one KV head, windows shorter
# than the tests' sequences, partial rotary, LongRoPE switching inside the tests' sequences, tied and untied.
_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS |= {
    "qwen3": _BASE | dict(model_type="qwen3", head_dim=48, num_key_value_heads=1, tie_word_embeddings=True),
    "llama3": _BASE | dict(model_type="llama", tie_word_embeddings=True, rope_theta=500000.0, head_dim=32,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Phi-4-mini's shape: partial rotary 0.75 (12 of 16 dims), LongRoPE switching at 16 positions, tied
    "phi3": _BASE | dict(model_type="phi3", partial_rotary_factor=0.75, original_max_position_embeddings=16,
                         tie_word_embeddings=True, pad_token_id=0,
                         rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                                       "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 12.0]}),
    "gemma": _BASE | dict(model_type="gemma", head_dim=32, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh"),
    "gemma2": _BASE | dict(model_type="gemma2", head_dim=32, sliding_window=6, query_pre_attn_scalar=20,
                           attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                           layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": _BASE | dict(model_type="gemma3_text", head_dim=32, num_key_value_heads=1, sliding_window=6,
                                query_pre_attn_scalar=24, rope_local_base_freq=100.0, rope_theta=10000.0,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}, num_hidden_layers=3,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granite": _BASE | dict(model_type="granite", embedding_multiplier=3.0, attention_multiplier=0.1,
                            residual_multiplier=0.5, logits_scaling=2.0, tie_word_embeddings=False),
    "olmo2": _BASE | dict(model_type="olmo2", tie_word_embeddings=False),
    "smollm3": _BASE | dict(model_type="smollm3", no_rope_layers=[1, 0], tie_word_embeddings=True, pad_token_id=0),
    "ministral": _BASE | dict(model_type="mistral", sliding_window=5, num_key_value_heads=1, head_dim=32),
    # mixtures of experts, fused: 8 experts, 2 per token, so the tests' tokens reach most of them
    "qwen3_moe-fused": _BASE | dict(model_type="qwen3_moe", head_dim=32, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
                                    tie_word_embeddings=False),  # layer 1 keeps a dense MLP
    "qwen2_moe": _BASE | dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, tie_word_embeddings=True),
    "mixtral": _BASE | dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=64,
                            num_key_value_heads=1, sliding_window=None),
    # gpt-oss: attention sinks, q/k/v/o biases, sliding (window 6) then full layers, YaRN, biased router and
    # experts with the clamped SwiGLU
    "gpt_oss": _BASE | dict(model_type="gpt_oss", head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                            intermediate_size=64, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                            tie_word_embeddings=False),
    "olmoe": _BASE | dict(model_type="olmoe", num_experts=8, num_experts_per_tok=2, intermediate_size=64,
                          tie_word_embeddings=False),
}

# Outside the fused table: the generic path (transformers' own modeling code, traced)
_GENERIC = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS |= {
    "gpt_neox": _GENERIC | dict(model_type="gpt_neox", rotary_pct=0.5, use_parallel_residual=True,
                                tie_word_embeddings=False),
    "stablelm": _GENERIC | dict(model_type="stablelm", num_key_value_heads=2, partial_rotary_factor=0.25),
    "phi": _GENERIC | dict(model_type="phi", partial_rotary_factor=0.5, qk_layernorm=False, resid_pdrop=0.0,
                           embd_pdrop=0.0, attention_dropout=0.0),
    "starcoder2": _GENERIC | dict(model_type="starcoder2", num_key_value_heads=1, sliding_window=5, tie_word_embeddings=False,
                                  residual_dropout=0.0, embedding_dropout=0.0),
    "falcon": dict(model_type="falcon", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_kv_heads=1, new_decoder_architecture=True, bos_token_id=1, eos_token_id=2,
                   max_position_embeddings=256),
    # a mixture of experts: 16 experts, 2 per token, so most inputs reach experts a trace's example did not
    "qwen3_moe": _GENERIC | dict(model_type="qwen3_moe", num_key_value_heads=2, head_dim=16, num_experts=16,
                                 num_experts_per_tok=2, moe_intermediate_size=32, tie_word_embeddings=False),
    # Mamba-2 layers beside attention: state beyond keys and values
    "bamba": _GENERIC | dict(model_type="bamba", num_key_value_heads=2, attn_layer_indices=[1]),
}
_VARIED = set(TINY_CONFIGS) - {"llama", "qwen2", "mistral", "gpt2"}
_RANDOM_BIASES = {"gpt_oss", "qwen2_moe"}  # biases (zero at init) and gpt-oss's sinks drawn too, so they matter


def make_tiny_checkpoint(model_type: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight HF checkpoint plus a small byte-level BPE tokenizer into out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[model_type])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is small; widen it so greedy paths are not all one token
        for name, p in model.named_parameters():
            if model_type in _VARIED and p.dim() < 2 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)  # norms (incl. Gemma's zero-initialized ones) that matter
            elif model_type in _RANDOM_BIASES and name.endswith(("bias", "sinks")):
                p.add_(torch.randn_like(p) * (2.0 if "sinks" in name else 0.5))
            elif p.dim() >= 2 and not (model_type in _VARIED and "embed" in name):
                # a tied embedding at init scale, so the residual stream is not just the input token's echo
                p.mul_(5.0)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, config.vocab_size)
    return out_dir


def _write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello world, this is a tiny tokenizer.",
              "Inferneo compiles models ahead of time and serves them with a KV cache."] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(out_dir)


# Backbones of the 2026 embedding models (tests/test_embedders_2026.py): saved as AutoModel base models
TINY_EMBEDDERS = {
    # Qwen3-Embedding: a causal qwen3 decoder, pooled on its last token (the tokenizer pads left)
    "qwen3": TINY_CONFIGS["qwen3"] | dict(max_position_embeddings=128),
    # EmbeddingGemma: gemma3_text with bidirectional attention, windows shorter than the tests' texts
    "gemma3_text": TINY_CONFIGS["gemma3_text"] | dict(use_bidirectional_attention=True, max_position_embeddings=128),
    # ModernBERT: alternating global / local (window 8) attention, RoPE
    "modernbert": dict(model_type="modernbert", vocab_size=512, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
                       global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, cls_token_id=1, sep_token_id=2, mlp_dropout=0.0, attention_dropout=0.0),
}


def make_tiny_embedder(model_type: str, out_dir: Path, seed: int = 0, padding_side: str = "right") -> Path:
    """A random-weight base model (AutoModel) plus the byte-level BPE tokenizer, with a pad token ("<unk>")
    and `padding_side`; weights scaled up so that texts get clearly different embeddings."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    cfg = dict(TINY_EMBEDDERS[model_type])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
            elif p.dim() >= 2 and "embed" not in name:
                p.mul_(3.0)
    out_dir = Path(out_dir)
    model.eval().save_pretrained(out_dir)
    _write_tokenizer(out_dir, config.vocab_size)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.pad_token, tok.chat_template = "<unk>", None  # a chat template makes sentence-transformers 5.7 format texts
    tok.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_path = out_dir / "tokenizer_config.json"  # as Qwen3-Embedding's: transformers reads it on load
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {
        "padding_side": padding_side, "model_input_names": ["input_ids", "attention_mask"]}))
    return out_dir


def make_tiny_mxfp4_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """The tiny gpt-oss checkpoint as OpenAI ships gpt-oss: its experts in MXFP4 (`*_blocks`: two 4-bit floats a
    byte, 32 a block; `*_scales`: a power-of-two exponent per block, biased by 127) and a quantization_config
    saying so. Random bytes: any 4-bit code is a valid value."""
    import torch
    from safetensors.torch import load_file, save_file

    out_dir = make_tiny_checkpoint("gpt_oss", Path(out_dir), seed)
    weights = load_file(str(out_dir / "model.safetensors"))
    config = json.loads((out_dir / "config.json").read_text())
    experts, hidden, inter = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    generator = torch.Generator().manual_seed(seed)
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}.mlp.experts."
        for name, (rows, cols) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            del weights[prefix + name]
            weights[prefix + name + "_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16),
                                                               dtype=torch.uint8, generator=generator)
            weights[prefix + name + "_scales"] = torch.randint(124, 129, (experts, rows, cols // 32),
                                                               dtype=torch.uint8, generator=generator)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
