"""Tokenization with `tokenizers` and chat templates with jinja2: no transformers on the deploy host."""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Collection, Optional, Sequence

from jinja2.ext import Extension
from tokenizers import Tokenizer as _HFTokenizer

from .errors import ManifestError, RequestError


def _token_text(value) -> Optional[str]:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: what its decode does when tokenizer_config.json says
    clean_up_tokenization_spaces (" ." -> ".", " n't" -> "n't", ...)."""
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text


# in transformers' order: each replacement runs over the result of the previous one
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) printable character for each byte, inverted: character -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class Tokenizer:
    """encode / decode / chat template over an artifact's tokenizer.json and tokenizer_config.json."""

    def __init__(self, root: Path, listed: Optional[Collection[str]] = None):
        """`listed`: the artifact's manifest-listed root files. Given, only those are read: a file added to a signed
        artifact after signing (a chat_template.jinja, say) is not used. None: a bare model's folder, read as is."""
        root = Path(root)

        def usable(name: str) -> bool:
            return (root / name).is_file() and (listed is None or name in listed)

        if listed is not None and "tokenizer.json" not in listed:
            raise ManifestError(f"{root}: the manifest does not list tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise ManifestError(f"{root / 'tokenizer.json'}: cannot load tokenizer: {e}") from None
        # transformers encodes without the file's truncation or padding unless a call asks for them
        self._tok.no_truncation()
        self._tok.no_padding()
        config_path = root / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text(encoding="utf-8")) if usable(config_path.name) else {}
        template_file = root / "chat_template.jinja"
        template = (template_file.read_text(encoding="utf-8") if usable(template_file.name)
                    else self.config.get("chat_template"))
        # a list of named templates (Command R's, Hermes'): transformers renders "default", or "tool_use" when the
        # request gives tools
        self._named_templates = ({t["name"]: t["template"] for t in template} if isinstance(template, list)
                                 else {})
        self.chat_template: Optional[str] = self._named_templates.get("default") if self._named_templates else template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        # transformers' decode cleans these spaces up after the tokenizer's own decoder where the config asks; as in
        # transformers 5, never a BPE model's text, which it corrupts ("a != b" -> "a!= b"; also for artifacts whose
        # config still says true, copied before builds wrote the value this rule gives)
        self.clean_up_spaces = (bool(self.config.get("clean_up_tokenization_spaces", False))
                                and type(self._tok.model).__name__ != "BPE")

    def token_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> Optional[int]:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> Optional[int]:
        return self.token_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Every token (added ones too) and its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long prompt tokenized on a worker thread then does
        # not stall the server's event loop
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up: Optional[bool] = None) -> str:
        """As transformers' decode. `clean_up`: whether to clean up tokenization spaces; None: as the tokenizer's
        config says (the incremental detokenizer decodes without, and cleans the joined text up itself)."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if (self.clean_up_spaces if clean_up is None else clean_up) else text

    @cached_property
    def _byte_level(self) -> bool:
        """Whether the decoder maps byte-level BPE's alphabet back to bytes (alone, or in a decoder Sequence)."""
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def token_bytes(self, token_id: int, text: Optional[str] = None) -> bytes:
        """A token's own bytes (OpenAI's logprobs `bytes`, which join into the text). A token holding part of a
        character decodes alone to U+FFFD, so its bytes come from its vocabulary entry: SentencePiece's byte
        fallback `<0xNN>` or byte-level BPE's alphabet. Any other token: its text's UTF-8. `text`: its decoded
        text, when the caller has it."""
        text = self.decode([token_id], skip_special_tokens=False, clean_up=False) if text is None else text
        piece = self._tok.id_to_token(token_id) if "\ufffd" in text else None
        if piece is not None:
            if m := _BYTE_FALLBACK.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
            alphabet = _byte_level_alphabet()
            if self._byte_level and all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        return text.encode("utf-8")

    # -- chat ---------------------------------------------------------------------------------------
    @cached_property
    def _compiled_template(self):
        if not self.chat_template:
            raise RequestError("this artifact's tokenizer has no chat template; use plain prompts")
        return compile_chat_template(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, template_kwargs: Optional[dict] = None,
                            template: Optional[str] = None) -> str:
        """Render messages to the prompt text, as transformers' apply_chat_template(tokenize=False) does.
        `template_kwargs`: extra template variables (vLLM's chat_template_kwargs, e.g. enable_thinking);
        `template`: a template used instead of the artifact's (--chat-template);
        `continue_final_message`: end the text right after the last message's content, so the model goes on
        with it (transformers' and vLLM's rule)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RequestError(f"messages[{i}] needs 'role' and 'content'")
        from .safe_template import render

        if template is None and (template_kwargs or {}).get("tools") is not None:
            template = self._named_templates.get("tool_use")
        env, compiled = compile_chat_template(template) if template else self._compiled_template
        final = None
        if continue_final_message:
            messages, final = _tag_final_message(messages)
        # transformers passes tools and documents (None when absent): a template may test `tools is not none`. Then
        # the request's variables: it may not replace the messages or the special tokens
        variables = {"tools": None, "documents": None, **(template_kwargs or {}), "messages": messages,
                     "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        text = render(compiled, env, variables)
        if continue_final_message:
            tag = _CONTINUE_TAG.strip()
            if final.strip() not in text or tag not in text:
                raise RequestError("continue_final_message: the chat template does not show the final message's "
                                   "content as is, so it cannot be continued")
            at = text.rindex(tag)
            # the tag as written: the content's own trailing whitespace stays; trimmed by the template: cut there
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **options) -> list[int]:
        """`options`: apply_chat_template's continue_final_message, template_kwargs and template."""
        # The template already places the special tokens, so none are added on top (as transformers does).
        text = self.apply_chat_template(messages, add_generation_prompt, **options)
        return self.encode(text, add_special_tokens=False)


# transformers' continue_final_message marker: appended to the final message's text before rendering, the text is
# cut where it shows up (so the message's own trailing whitespace, and text after it, are as transformers has them)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: list[dict]) -> tuple[list[dict], str]:
    """(messages with the tag after the final message's text (its last text block, for a list of parts), that
    text); the caller's messages are left as they are."""
    if not messages:
        raise RequestError("continue_final_message: there is no final message to continue")
    last = dict(messages[-1])
    content = last["content"]
    if isinstance(content, (list, tuple)):
        blocks = [dict(b) if isinstance(b, dict) else b for b in content]
        block = next((b for b in reversed(blocks) if isinstance(b, dict) and isinstance(b.get("text"), str)), None)
        if block is None:
            raise RequestError("continue_final_message: the final message has no text to continue")
        final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
        last["content"] = blocks
    elif isinstance(content, str):
        final = content
        last["content"] = content + _CONTINUE_TAG
    else:
        raise RequestError("continue_final_message: the final message has no text to continue")
    return [*messages[:-1], last], final


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson filter: JSON without Jinja's HTML escaping, with json.dumps' options (Kimi K2's
    template writes `tools | tojson(separators=(',', ':'))`)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for training masks;
    SmolLM3's template has it): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=8)
def compile_chat_template(source: str):
    """The sandboxed (safe_template) environment and compiled template for a chat template's source; cached, so a
    --chat-template shared by every model is compiled once."""
    from .safe_template import BoundedEnvironment

    def raise_exception(message):
        raise RequestError(f"chat template: {message}")

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, env.bounded(source)
