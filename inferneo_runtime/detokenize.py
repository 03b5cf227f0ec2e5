"""Incremental detokenization with stop strings.

Text is released only when it is final: not an incomplete UTF-8 sequence (byte-fallback tokens decode to
U+FFFD until their last byte arrives) and not a possible beginning of a stop string. The released pieces,
joined, are the completion's text, so streamed and non-streamed output are the same string: transformers'
decode of the output ids (after the prompt's last tokens, as its text-generation pipeline and vLLM do, so that a
SentencePiece leading space is kept), spaces cleaned up as transformers' decode does when the tokenizer asks.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

from .tokenizer import Tokenizer, clean_up_tokenization

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
        self.raw = ""  # decoded output so far (final parts only), before transformers' space clean-up
        self.cleaned = 0  # how much of `raw` is cleaned up into `text`
        self.text = ""  # the output's final text so far
        self.released = 0  # how much of `text` has been handed out
        self.stopped = False

    def _decode_new(self) -> str:
        decode = partial(self.tokenizer.decode, skip_special_tokens=self.skip_special, clean_up=False)
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
        self.raw += self._decode_new()
        self._clean_up(final=False)
        if self.stop:
            if (hit := self._find_stop()) is not None:
                return self._release(hit)
            return self._release(len(self.text) - self._partial_stop_suffix())
        return self._release(len(self.text))

    def _find_stop(self) -> Optional[int]:
        """On the first stop string in the unreleased text: cut `text` there, set `stopped`, return the cut."""
        search_from = max(0, self.released - max(len(s) for s in self.stop) + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        cut = i + len(s) if self.include_stop else i
        self.text = self.text[:cut]
        self.stopped = True
        return cut

    def finish(self) -> str:
        """The sequence ended (EOS or length): release whatever is held back."""
        if not self.stopped:
            decode = partial(self.tokenizer.decode, skip_special_tokens=self.skip_special, clean_up=False)
            tail = decode(self.ids[self.prefix_offset:])
            head = decode(self.ids[self.prefix_offset:self.read_offset])
            if len(tail) > len(head):  # an incomplete byte sequence at the very end is emitted as is
                self.raw += tail[len(head):]
                self.prefix_offset = self.read_offset = len(self.ids)
            self._clean_up(final=True)
            if self.stop and (hit := self._find_stop()) is not None:  # one the last clean-up completed
                return self._release(hit)
        return self._release(len(self.text))

    def _clean_up(self, final: bool) -> None:
        """Move `raw` into `text`, cleaned up as transformers' decode would. Every clean-up pattern starts with a
        space and is at most 4 characters long, so the text up to a point with no space in the 3 characters before
        it cleans up the same whatever follows; the rest waits for more text (or the end)."""
        if not self.tokenizer.clean_up_spaces:
            self.text, self.cleaned = self.raw, len(self.raw)
            return
        cut = len(self.raw)
        while not final and " " in self.raw[max(cut - 3, self.cleaned):cut]:
            cut = self.raw.index(" ", max(cut - 3, self.cleaned))
        self.text += clean_up_tokenization(self.raw[self.cleaned:cut])
        self.cleaned = cut

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
