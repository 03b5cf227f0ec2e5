"""gpt-oss's "harmony" output format, split into reasoning, content and tool calls (what vLLM's `openai_gptoss`
reasoning parser and tool parser do together).

The prompt ends with `<|start|>assistant`; the model then writes messages, each a header and a body:
    <|channel|>analysis<|message|>REASONING<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>
The markers are special tokens (the server keeps them in the text); `<|return|>` and `<|call|>` are EOS ids, so a
finished output's text ends inside its last body. A header with a recipient (`to=functions.NAME`, after the role or
the channel) makes a tool call whose arguments are the body; else the analysis channel is reasoning, and every other
message (final, a recipient-less commentary preamble) is content. Text outside any message (a model that writes
plain text) is content. Several messages of one kind are joined with "\n".

Structured outputs (`Harmony.constrain`) apply to the final channel: an optional analysis message, then
`<|start|>assistant<|channel|>final<|message|>` and the answer. A forced tool call (tool_choice "required" or named;
`Harmony.call_format`) is instead a commentary message to one of the tools, its arguments matching the tool's
parameters, after the same optional analysis.
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from .reasoning import Split, _encodable, _grammar_list, _tag_item, composed_constraint
from .structured import Constraint
from .tool_base import ToolCall, _json_rule

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
MARKERS = (START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN)
_OPENERS = (CHANNEL, START, MESSAGE, "to=")  # what an output that starts with a header starts with (role aside)
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")


def detect(template: Optional[str], tokenizer) -> bool:
    """Whether a model writes harmony: its chat template uses `<|channel|>` and `<|message|>` and its tokenizer
    writes them."""
    if not template or CHANNEL not in template or MESSAGE not in template:
        return False
    return all(_encodable(tokenizer, marker) for marker in (START, CHANNEL, MESSAGE, END))


def _partial_marker(text: str) -> int:
    """How many characters at the end of `text` could be the start of a marker (held back while streaming)."""
    at = text.rfind("<", max(0, len(text) - max(map(len, MARKERS)) + 1))
    while at >= 0:
        if any(m.startswith(text[at:]) for m in MARKERS):
            return len(text) - at
        at = text.find("<", at + 1)
    return 0


def _classify(header: str) -> tuple[str, Optional[str]]:
    """A message header's (kind, tool name): "call" with a recipient, "reasoning" on the analysis channel, else
    "content" (final, a commentary preamble, no channel)."""
    to = _RECIPIENT.search(header)
    if to:
        name = to.group(1)
        return "call", name[len("functions."):] if name.startswith("functions.") else name
    channel = _CHANNEL_NAME.search(header)
    return ("reasoning" if channel and channel.group(1) == "analysis" else "content"), None


class HarmonyStream:
    """Splits one choice's streamed text: `feed(delta)` -> (reasoning, content) to emit now, text that may be the
    start of a marker held until the next delta tells; `finish()` -> what was still held; then `calls` holds the
    tool calls. Reassembled, the parts equal `Harmony.split`'s whatever the delta boundaries."""

    def __init__(self):
        self.state = "start"  # start (nothing decided yet) | outside (plain text) | header | body
        self.pending = ""
        self.kind: Optional[str] = None  # the open message's, or "content" outside messages
        self.kinds: list[Optional[str]] = []  # each message's kind (None: its header never ended)
        self.index = -1  # the message being read (-1: none; plain text)
        self.fresh = True  # nothing of the open message or plain-text run emitted yet (a separator is due)
        self.seen: set[str] = set()  # kinds with text emitted so far (the next message of one is joined by "\n")
        self.opened: set[str] = set()  # kinds whose body began (split's reasoning: "" vs None)
        self.bodies: list[tuple[str, list[str]]] = []  # tool calls: (name, body pieces)
        self.calls: list[ToolCall] = []
        self.out = {"reasoning": "", "content": ""}

    def _emit(self, kind: str, text: str) -> None:
        if kind == "call":
            self.bodies[-1][1].append(text)
        elif text:
            if self.fresh and kind in self.seen:
                text = "\n" + text  # a new message (or plain-text run) of a kind written before
            self.fresh = False
            self.seen.add(kind)
            self.out[kind] += text

    def _new(self, state: str, pending: str) -> None:
        """Close the open message (or plain-text run); go on in `state` with `pending`."""
        self.state, self.pending, self.fresh = state, pending, True
        if state == "header":
            self.index, self.kind = len(self.kinds), None
            self.kinds.append(None)
        elif state == "outside":
            self.kind = "content"

    def _step(self) -> bool:
        """Consume what it can of `pending`; False when it must wait for more text."""
        text = self.pending
        if self.state == "start":
            stripped = text.lstrip()
            if not stripped or any(o.startswith(stripped) and o != stripped for o in _OPENERS):
                return False  # whitespace, or maybe the start of a header: wait
            self._new("header" if stripped.startswith(_OPENERS) else "outside", text)
            return True
        if self.state == "header":
            at = text.find(MESSAGE)
            ends = [i for m in (END, RETURN, CALL) if 0 <= (i := text.find(m)) and (at < 0 or i < at)]
            if ends:  # a header that ends before its body: dropped
                self._new("outside", text[min(ends):])
                return True
            if at < 0:
                return False  # a header is never emitted: wait for its end
            self.kind, name = _classify(text[:at])
            self.kinds[self.index] = self.kind
            self.opened.add(self.kind)
            if self.kind == "call":
                self.bodies.append((name, []))
            self.state, self.pending = "body", text[at + len(MESSAGE):]
            return True
        hits = [(i, m) for m in MARKERS if (i := text.find(m)) >= 0]
        if not hits:
            keep = _partial_marker(text)
            if self.state == "outside" and text[:len(text) - keep]:
                self.index = -1
            self._emit(self.kind, text[:len(text) - keep])
            self.pending = text[len(text) - keep:]
            return False
        at, marker = min(hits)
        if self.state == "outside" and text[:at]:
            self.index = -1
        self._emit(self.kind, text[:at])
        rest = text[at + len(marker):]
        if marker in (START, CHANNEL) or (marker == MESSAGE and self.state == "outside"):
            self._new("header", text[at:])  # a new message's header (the marker is part of it)
        elif marker in (END, RETURN, CALL):
            self._new("outside", rest)  # the message ends
        else:
            self.pending = rest  # a stray marker: dropped
        return True

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        while self.pending and self._step():
            pass
        out, self.out = self.out, {"reasoning": "", "content": ""}
        return out["reasoning"], out["content"]

    def finish(self) -> tuple[str, str]:
        """The output has ended: held text is its message's (an unfinished header is dropped), calls are made."""
        if self.state in ("start", "outside", "body"):
            self._emit(self.kind or "content", self.pending)
        self.pending = ""
        self.calls = [ToolCall(name, "".join(body).strip()) for name, body in self.bodies]
        out, self.out = self.out, {"reasoning": "", "content": ""}
        return out["reasoning"], out["content"]


class _CallFormat:
    """What ChatCompletionRequest.tool_constraint asks of a tool-call parser: `grammar(tools, parallel)`, a Lark
    grammar of one call (`<|call|>` ends the turn, so never several) as harmony writes it, to one of `tools`."""

    name = "harmony"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def grammar(self, tools: Sequence[dict], parallel: bool) -> str:
        channel, constrain, message = (_tag_item(self.tokenizer, m)[0] for m in (CHANNEL, CONSTRAIN, MESSAGE))
        rules = [f"start: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
        for i, tool in enumerate(tools):
            fn = tool["function"]
            header = json.dumps(f"commentary to=functions.{fn['name']} ")
            rules.append(f'call_{i}: {channel} {header} {constrain} "json" {message} '
                         f'{_json_rule(fn.get("parameters") or {"type": "object"})}')
        return "\n".join(rules)


class Harmony:
    """The harmony split, with `reasoning.Reasoning`'s interface (the server uses either)."""

    parses_tools = True  # tool calls come from the split, not from a tool-call parser

    def keeps_special(self, tokenizer) -> bool:
        return True  # the markers are special tokens

    def call_format(self, tokenizer) -> _CallFormat:
        """The format forced tool calls are written in (their constraint then goes through `constrain`)."""
        return _CallFormat(tokenizer)

    def split(self, text: str) -> Split:
        """A finished output's reasoning (None: no analysis message), content (None: empty) and tool calls."""
        stream = HarmonyStream()
        parts = [a + b for a, b in zip(stream.feed(text), stream.finish())]
        return Split(parts[0] if "reasoning" in stream.opened else None, parts[1] or None, stream.calls)

    def stream(self) -> HarmonyStream:
        return HarmonyStream()

    def token_count(self, tokenizer, token_ids: Sequence[int], skip_special_tokens: bool = True) -> int:
        """OpenAI's reasoning_tokens: the tokens of the analysis messages, their headers and ends included. Each
        token is fed alone (the markers are tokens of their own) and counted by the message it fell in."""
        stream, where = HarmonyStream(), []
        for t in token_ids:
            stream.feed(tokenizer.decode([t], skip_special_tokens=False))
            where.append(stream.index)
        return sum(1 for i in where if i >= 0 and stream.kinds[i] == "reasoning")

    def constrain(self, constraint: Constraint, tokenizer) -> Constraint:
        """`constraint` enforced on the final channel: after an optional analysis message, the final header. A
        forced call's (param "tools": `call_format`'s grammar) is a message of its own: no final header."""
        start, channel, message = (_tag_item(tokenizer, m)[0] for m in (START, CHANNEL, MESSAGE))
        end, end_is_token = _tag_item(tokenizer, END)
        grammars = _grammar_list(constraint.grammar())
        grammars[0]["name"] = "answer"
        head = "" if constraint.param == "tools" else f'{channel} "final" {message} '
        # the analysis text ends at <|end|>: a token, which text never matches, or text, matched lazily
        analysis = "analysis" if end_is_token else "analysis[lazy]"
        lark = (f'start: (analysis {start} "assistant")? {head}@answer\n'
                f'{analysis}: {channel} "analysis" {message} ANALYSIS_TEXT {end}\n'
                'ANALYSIS_TEXT: /(.|\\n)*/\n')
        return composed_constraint(constraint, lark, grammars, "harmony", "this model's analysis channel")
