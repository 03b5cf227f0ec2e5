"""Reasoning ("thinking") output: the chain of thought models such as Qwen3, SmolLM3, QwQ, DeepSeek-R1 distills and
Phi-4-reasoning write between `<think>` and `</think>` before their answer, split out of the answer (what vLLM's
`--reasoning-parser`, SGLang and llama.cpp's server do).

Which models: `reasoning_parser` (server setting, or a `models:` entry's): "auto" (the default) splits when the chat
template shows both tags and the tokenizer can write them (`detect`); "none" never; "think" (or vLLM's names for the
same format, "deepseek_r1" and "qwen3") always.

Where reasoning starts (`Reasoning`):
  - the rendered prompt ends with `<think>` (Qwen3-2507 thinking, DeepSeek-R1 templates): the output starts inside
    reasoning;
  - else, when the output (after leading whitespace) starts with `<think>`: reasoning from there;
  - else the output is all content (Qwen3 with enable_thinking false renders an empty, closed block in the prompt).
Reasoning ends at the first `</think>`; the content is the text after it, leading newlines stripped (as vLLM). A
reasoning that never closes (max_tokens hit) is all reasoning, with no content. The tags are never in either part.

Structured outputs and forced tool calls (`Reasoning.constrain`): the grammar applies after the reasoning, as vLLM
does: it is prefixed with "reasoning text, `</think>`, whitespace" (optional, after an optional `<think>`, when the
prompt does not open the reasoning).

gpt-oss's harmony format has its own split with this one's interface (harmony.py), which also yields tool calls.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

from .structured import Constraint, ConstraintError, _llguidance

OPEN, CLOSE = "<think>", "</think>"


def _encodable(tokenizer, tag: str) -> bool:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return bool(ids) and tokenizer.decode(ids, skip_special_tokens=False, clean_up=False) == tag


def detect(template: Optional[str], tokenizer) -> bool:
    """Whether a model writes <think> reasoning: its chat template uses both tags and its tokenizer writes them."""
    if not template or OPEN not in template or CLOSE not in template:
        return False
    return all(_encodable(tokenizer, tag) for tag in (OPEN, CLOSE))


def enabled(setting: Optional[str], template: Optional[str], tokenizer) -> bool:
    """Whether to split reasoning for a model, from its `reasoning_parser` setting (None: "auto")."""
    if setting == "none":
        return False
    if setting in (None, "auto"):
        return detect(template, tokenizer)
    return True


def _single_token(tokenizer, tag: str) -> Optional[int]:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def tags_are_special(tokenizer) -> bool:
    """Whether a tag is a special token, which decoding with skip_special_tokens would drop from the text."""
    special = {i for i, t in tokenizer._tok.get_added_tokens_decoder().items() if t.special}
    return any(_single_token(tokenizer, tag) in special for tag in (OPEN, CLOSE))


def prompt_opens_reasoning(tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends inside an open <think> (its last few tokens, whitespace aside)."""
    tail = tokenizer.decode(list(prompt_ids[-8:]), skip_special_tokens=False, clean_up=False)
    return tail.rstrip().endswith(OPEN)


def text_opens_reasoning(text: str) -> bool:
    """Whether `text` (an assistant message the model continues: continue_final_message) ends inside a <think>."""
    return text.rfind(OPEN) > text.rfind(CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class Split:
    reasoning: Optional[str]  # None: the output has no reasoning
    content: Optional[str]  # None: no answer (the reasoning did not close, or nothing followed it)
    calls: Sequence = ()  # tool_base.ToolCall: the tool calls of a format that marks them itself (harmony.py)


class Reasoning:
    """One request's reasoning split: `starts_inside` when its prompt opened the reasoning."""

    parses_tools = False  # tool calls come from a tool-call parser, reading the content (harmony.Harmony: True)

    def __init__(self, starts_inside: bool):
        self.starts_inside = starts_inside

    def keeps_special(self, tokenizer) -> bool:
        """Whether the output text must keep special tokens for the split to see the tags."""
        return tags_are_special(tokenizer)

    def split(self, text: str) -> Split:
        """A finished output's reasoning and content."""
        if not self.starts_inside:
            stripped = text.lstrip()
            if not stripped.startswith(OPEN):
                return Split(None, text)
            text = stripped[len(OPEN):]
        end = text.find(CLOSE)
        if end < 0:
            return Split(text, None)
        return Split(text[:end], text[end + len(CLOSE):].lstrip("\n") or None)

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self.starts_inside)

    def token_count(self, tokenizer, token_ids: Sequence[int], skip_special_tokens: bool = True) -> int:
        """OpenAI's reasoning_tokens: the output's tokens up to and including the one that completes `</think>`
        (all of them when the reasoning does not close; 0 when there is none)."""
        def text(k: int) -> str:  # the first k tokens' text
            return tokenizer.decode(list(token_ids[:k]), skip_special_tokens=skip_special_tokens)

        if self.split(text(len(token_ids))).reasoning is None:
            return 0
        low, high = 1, len(token_ids)  # the fewest tokens whose text holds the closing tag (monotonic: binary search)
        if CLOSE not in text(high):
            return high
        while low < high:
            mid = (low + high) // 2
            if CLOSE in text(mid):
                high = mid
            else:
                low = mid + 1
        return low

    def constrain(self, constraint: Constraint, tokenizer) -> Constraint:
        """`constraint` enforced after the reasoning: its grammar prefixed with the reasoning block."""
        return after_reasoning(constraint, tokenizer, self.starts_inside)


class ReasoningStream:
    """Splits one choice's streamed text: `feed(delta)` -> (reasoning, content) to emit now; text that may be part
    of a tag is held until the next delta tells. Reassembled, the parts equal `Reasoning.split`'s."""

    calls = ()  # no tool calls of its own (harmony.HarmonyStream has them)

    def __init__(self, starts_inside: bool):
        self.state = "reasoning" if starts_inside else "start"  # start -> reasoning -> after_close -> content
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning = content = ""
        while self.pending:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if not stripped or (len(stripped) < len(OPEN) and OPEN.startswith(stripped)):
                    break  # whitespace, or maybe the start of <think>: wait
                if stripped.startswith(OPEN):
                    self.state, self.pending = "reasoning", stripped[len(OPEN):]
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = self.pending.find(CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end]
                    self.state, self.pending = "after_close", self.pending[end + len(CLOSE):]
                    continue
                keep = _partial_suffix(self.pending, CLOSE)
                reasoning += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            elif self.state == "after_close":
                self.pending = self.pending.lstrip("\n")
                if self.pending:
                    self.state = "content"
            else:
                content, self.pending = content + self.pending, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held once the output has ended: an unclosed reasoning's tail, or text that was not a tag."""
        rest, self.pending = self.pending, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest if self.state in ("start", "content") else ""


# -- constraints after the reasoning ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _AfterReasoning(Constraint):
    """A constraint whose `spec` is the composed llguidance grammar itself (see `after_reasoning`)."""

    def grammar(self) -> str:
        return self.spec


def _tag_item(tokenizer, tag: str) -> tuple[str, bool]:
    """(the tag in a Lark grammar, whether it is a token): llguidance sees an added token only as itself, never
    as text, so a tag that is one added token is written `<[id]>`; any other tag is text."""
    token = _single_token(tokenizer, tag)
    if token is not None and token in tokenizer._tok.get_added_tokens_decoder():
        return f"<[{token}]>", True
    return json.dumps(tag), False


def _grammar_list(grammar: str) -> list[dict]:
    """An llguidance grammar's list of grammars: its JSON form's (schemas, regexes), or one Lark grammar."""
    try:
        top = json.loads(grammar)
    except ValueError:
        top = None
    if isinstance(top, dict) and isinstance(top.get("grammars"), list):
        return [dict(g) for g in top["grammars"]]
    return [{"lark_grammar": grammar}]


def after_reasoning(constraint: Constraint, tokenizer, starts_inside: bool) -> Constraint:
    """`constraint` with a reasoning block allowed before it: reasoning text, then `</think>` and whitespace. When
    the prompt does not open the reasoning, the block is optional and starts with `<think>`."""
    open_tag, _ = _tag_item(tokenizer, OPEN)
    close_tag, close_is_token = _tag_item(tokenizer, CLOSE)
    grammars = _grammar_list(constraint.grammar())
    grammars[0]["name"] = "answer"
    block = "reasoning GAP" if starts_inside else f"(GAP {open_tag} reasoning GAP)?"
    # reasoning text ends at the closing tag: a token, which text never matches, or text, matched lazily
    reasoning = (f"reasoning: REASONING_TEXT {close_tag}" if close_is_token
                 else f"reasoning[lazy]: REASONING_TEXT {close_tag}")
    lark = f"start: {block} @answer\n{reasoning}\nREASONING_TEXT: /(.|\\n)*/\nGAP: /[ \\t\\r\\n]*/\n"
    return composed_constraint(constraint, lark, grammars, "after_reasoning", "this model's reasoning")


def composed_constraint(constraint: Constraint, lark: str, grammars: list[dict], name: str, what: str) -> Constraint:
    """A constraint whose top grammar is `lark`, which refers to `grammars` (the request's, the first named
    "answer"); checked now, so a grammar that cannot be composed is a 400 naming `what` it follows."""
    composed = json.dumps({"grammars": [{"lark_grammar": lark}, *grammars]})
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(composed)
    if is_error:
        raise ConstraintError(f"{constraint.param}: cannot be enforced after {what}: "
                              f"{messages[0] if messages else ''}", constraint.param)
    return _AfterReasoning(f"{name}:{constraint.kind}", composed, constraint.param)
