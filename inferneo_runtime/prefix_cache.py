"""Prefix caching: the keys/values of prompt prefixes, kept across requests so a shared prefix (a system prompt,
few-shot examples, the earlier turns of a chat) is prefilled once.

Block-granular: a sequence is cut into blocks of `block_size` tokens, and block i is keyed by a hash of all
tokens up to its end (so a key names the whole prefix, not just the block). A lookup walks a prompt's blocks
from the start and stops at the first miss; the hit blocks are copied into the request's cache slot and only
the rest of the prompt is prefilled. The stored blocks are copies, never views of a slot, so evicting a block
or reusing a slot cannot change what another request reads. Memory is bounded by `max_bytes` with LRU
eviction; a lookup refreshes a prefix deepest block first, so a parent outlives its children and a chain is
evicted from its end. A lock makes it safe to share between engines on several threads.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .backends.base import KVCache
from .errors import RequestError

DEFAULT_BLOCK = 16


class PrefixCache:
    def __init__(self, max_bytes: int, block_size: int = DEFAULT_BLOCK):
        if not isinstance(block_size, int) or block_size < 1:
            raise RequestError(f"prefix cache block_size={block_size!r} is invalid: must be an integer >= 1")
        if max_bytes < 0:
            raise RequestError(f"prefix cache max_bytes={max_bytes!r} is invalid: must be >= 0")
        self.max_bytes = int(max_bytes)
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, Any] = OrderedDict()  # prefix key -> [layers, 2, kv_heads, block, dim]
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache (for /metrics and bench)
        self.lookup_tokens = 0  # prompt tokens looked up
        self.evictions = 0

    def _keys(self, ids: Sequence[int], blocks: int, salt: bytes = b"") -> list[bytes]:
        keys, h = [], hashlib.blake2b(digest_size=16)
        h.update(salt)  # (empty: the keys of the token ids alone)
        arr = np.asarray(ids, dtype=np.int64)
        for b in range(blocks):
            h.update(arr[b * self.block_size:(b + 1) * self.block_size].tobytes())
            keys.append(h.copy().digest())
        return keys

    def __len__(self) -> int:
        return len(self._blocks)

    def load(self, cache: KVCache, slot: int, ids: Sequence[int], salt: bytes = b"") -> int:
        """Copy the longest cached prefix of `ids` (whole blocks, leaving at least the last token to compute)
        into `slot`; returns how many positions it filled. `salt`: blocks stored with the same salt only (keys
        and values that depend on more than the token ids, e.g. LongRoPE's rotation; see Engine)."""
        bs = self.block_size
        with self._lock:
            self.lookup_tokens += len(ids)
            hits = []
            for key in self._keys(ids, (len(ids) - 1) // bs, salt):
                block = self._blocks.get(key)
                if block is None:
                    break
                hits.append((key, block))
            for key, _ in reversed(hits):  # deepest first: parents end up most recently used
                self._blocks.move_to_end(key)
            self.hit_tokens += len(hits) * bs
        for b, (_, block) in enumerate(hits):
            cache.data[:, :, slot, :, b * bs:(b + 1) * bs] = block
        return len(hits) * bs

    def store(self, cache: KVCache, slot: int, ids: Sequence[int], length: int, salt: bytes = b"") -> None:
        """Remember the whole blocks of `ids` whose keys/values sit in `slot`'s first `length` positions."""
        bs = self.block_size
        keys = self._keys(ids, min(length, len(ids)) // bs, salt)
        with self._lock:
            new = [(b, k) for b, k in enumerate(keys) if k not in self._blocks]
        copies = []
        for b, key in new:
            view = cache.data[:, :, slot, :, b * bs:(b + 1) * bs]
            copies.append((key, view.clone() if hasattr(view, "clone") else view.copy()))
        with self._lock:
            for key, block in copies:
                if key not in self._blocks:
                    self._blocks[key] = block
                    self.nbytes += _nbytes(block)
            for key in reversed(keys):
                if key in self._blocks:  # (another engine may have evicted it meanwhile)
                    self._blocks.move_to_end(key)
            while self.nbytes > self.max_bytes and self._blocks:
                _, block = self._blocks.popitem(last=False)
                self.nbytes -= _nbytes(block)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.nbytes = 0


def _nbytes(block) -> int:
    return int(block.nbytes) if hasattr(block, "nbytes") else int(block.element_size() * block.nelement())
