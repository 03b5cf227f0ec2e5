"""Fix the tokenizer files copied into the artifact root: apply the recipe's `tokenizer:` overrides, then rewrite
tokenizer.json and tokenizer_config.json as this build's transformers loads them, so the runtime (tokenizers
alone) encodes and decodes as transformers does."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .gguf_source import no_progress_bars
from .recipe import TokenizerOverrides
from .source_errors import SourceError


def tokenizer_vocab(path: Path, named: Path) -> dict[str, int]:
    """Every token of the tokenizer at `path` (added ones too) and its id; a file that does not load is named as
    `named`, the checkpoint's own."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
        raise SourceError(f"{named}: cannot load the tokenizer: {e}") from None


def apply_tokenizer_overrides(root: Path, fix: TokenizerOverrides, vocab: dict[str, int]) -> None:
    """Write the recipe's `tokenizer:` fixes into the copied files; `vocab`: the tokenizer's tokens and ids."""
    changes = fix.model_dump(exclude_none=True)
    if not changes:
        return
    for field in ("bos_token", "eos_token", "pad_token"):  # before anything is written
        token = changes.get(field)
        if token is not None and token not in vocab:
            raise SourceError(f"source.tokenizer.{field}: {token!r} is not a token of the checkpoint's tokenizer "
                              "(tokenizer.json)")
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    # the token add_bos_token prepends: the override's, else the checkpoint's (a plain PreTrainedTokenizerFast
    # reads no add_bos_token, so it goes into the post-processor either way)
    bos = fix.bos_token or config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if fix.add_bos_token and bos not in vocab:
        raise SourceError(f"source.tokenizer.add_bos_token: true, but the checkpoint's bos_token {bos!r} is not a "
                          "token of its tokenizer (tokenizer.json); give source.tokenizer.bos_token")
    config.update(changes)
    if "chat_template" in changes:
        (root / "chat_template.jinja").unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    special_path = root / "special_tokens_map.json"
    special = json.loads(special_path.read_text()) if special_path.is_file() else {}
    special.update({k: v for k, v in changes.items() if k.endswith("_token") and k != "add_bos_token"})
    special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    tok_path = root / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    if fix.add_bos_token is False and _adds_bos(tok.get("post_processor")):
        tok["post_processor"] = None  # plain text gets no special token prepended
    elif fix.add_bos_token:
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))

    gen_path = root / "generation_config.json"
    if fix.eos_token and gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        gen["eos_token_id"] = vocab[fix.eos_token]
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")


def write_tokenizer_as_transformers_runs_it(root: Path, named: Path, trust_remote_code: bool = False) -> None:
    """Rewrite the copied tokenizer.json and tokenizer_config.json as this build's transformers loads them, so the
    runtime (tokenizers alone) encodes and decodes as that transformers does: its tokenizer classes rebuild
    parts of tokenizer.json from tokenizer_config.json (Llama's and Gemma's add_bos_token / add_eos_token; in
    transformers 5 their whole normalizer and pre-tokenizer); its decode's space clean-up as transformers 5 does it.
    `named`: the checkpoint's folder, for messages."""
    from transformers import AutoTokenizer

    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("split_special_tokens"):  # special tokens in the prompt read as text: encode has no such switch
        raise SourceError(f"{named / config_path.name}: split_special_tokens="
                          f"{json.dumps(config['split_special_tokens'])} is not supported")
    try:
        with no_progress_bars():
            tok = AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a tokenizer it cannot build
        raise SourceError(f"{named / 'tokenizer.json'}: transformers cannot load this tokenizer: {e}") from None
    if not tok.is_fast:
        raise SourceError(f"{named}: transformers loads a slow {type(tok).__name__} here, which the runtime "
                          "cannot reproduce; the checkpoint needs a fast tokenizer (tokenizer.json)")
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    if not config_path.is_file():
        return  # nothing to record: transformers' defaults (no clean-up) are the runtime's
    # The space clean-up (" ." -> ".") as transformers 5 applies it: never to a BPE model's text, which it corrupts
    # ("a != b" -> "a!= b"; transformers 4 did it wherever the config asked, vLLM's streaming never does)
    bpe = type(tok.backend_tokenizer.model).__name__ == "BPE"
    config["clean_up_tokenization_spaces"] = bool(tok.clean_up_tokenization_spaces) and not bpe
    # special tokens given only in special_tokens_map.json (older checkpoints): chat templates read them
    for field in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if config.get(field) is None and getattr(tok, field, None) is not None:
            config[field] = str(getattr(tok, field))
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _adds_bos(post_processor: Optional[dict]) -> bool:
    if not post_processor:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post_processor.get("processors", []))
    single = post_processor.get("single") or []
    return post_processor.get("type") == "TemplateProcessing" and any("SpecialToken" in part for part in single)
