"""Incremental detokenization with stop strings.

Text is released only when it is final: not an incomplete UTF-8 sequence (byte-fallback tokens decode to
U+FFFD until their last byte arrives) and not a possible beginning of a stop string. The released pieces,
joined, are the completion's text, so streamed and non-streamed output are the same string.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

from .tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading-space rules see their neighbour


class StopStringDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output: cut after the stop string
        self.skip_special = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(stop)
        self.text = ""  # decoded output so far (final parts only)
        self.released = 0  # how much of `text` has been handed out
        self.stopped = False

    def _decode_new(self) -> str:
        decode = partial(self.tokenizer.decode, skip_special_tokens=self.skip_special)
        before = decode(self.ids[self.prefix_offset:self.read_offset])
        after = decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def push(self, token_id: int) -> str:
        """Add a generated token; return the newly final text (may be empty). Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text += self._decode_new()
        if self.stop:
            search_from = max(0, self.released - max(len(s) for s in self.stop) + 1)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                i, s = min(hits)
                cut = i + len(s) if self.include_stop else i
                self.text = self.text[:cut]
                self.stopped = True
                return self._release(cut)
            return self._release(len(self.text) - self._partial_stop_suffix())
        return self._release(len(self.text))

    def finish(self) -> str:
        """The sequence ended (EOS or length): release whatever is held back."""
        if not self.stopped:
            decode = partial(self.tokenizer.decode, skip_special_tokens=self.skip_special)
            tail = decode(self.ids[self.prefix_offset:])
            head = decode(self.ids[self.prefix_offset:self.read_offset])
            if len(tail) > len(head):  # an incomplete byte sequence at the very end is emitted as is
                self.text += tail[len(head):]
                self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(len(self.text))

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of `text` that begins some stop string (held back until resolved)."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if s.startswith(self.text[-n:]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        piece = self.text[self.released:upto]
        self.released = upto
        return piece


def detokenize(tokenizer: Tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int],
               stop: Sequence[str] = ()) -> tuple[str, Optional[int]]:
    """Non-streaming helper: (text, index of the token that completed a stop string or None)."""
    d = StopStringDetokenizer(tokenizer, prompt_ids, stop)
    for i, t in enumerate(token_ids):
        d.push(t)
        if d.stopped:
            return d.text, i
    d.finish()
    return d.text, None
