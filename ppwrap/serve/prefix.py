"""Prompt-prefix reuse: a new prompt that starts with tokens already computed
(a chat template, a system prompt, the earlier turns of a conversation)
prefills only the rest.

Each rank keeps the caches of its own layers for recent sequences, least
recently used first out, under a byte bound. Ranks never exchange messages
about it: every rank sees the same prompts and generated tokens in the same
order, and every decision here depends only on those and on numbers agreed once
at startup (bytes per token, whether caches can be trimmed), so all ranks make
the same hits and evictions.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

__all__ = ["PrefixCache", "bytes_per_token", "reusable"]


def reusable(cache: Sequence[Any]) -> bool:
    """Whether these caches can hold a prefix for reuse: each counts its tokens
    and can be cut back to fewer (mlx-lm's KV caches; not recurrent states)."""
    return all(hasattr(c, "offset") and hasattr(c, "trim") and c.is_trimmable() for c in cache)


def bytes_per_token(cache: Sequence[Any]) -> int:
    """This rank's cache bytes per token (filled caches; others hold no arrays)."""
    total = 0
    for c in cache:
        keys = getattr(c, "keys", None)
        if isinstance(keys, mx.array) and keys.ndim >= 3 and keys.shape[2] > 0:
            total += (keys.nbytes + c.values.nbytes) // keys.shape[2]
    return total


class PrefixCache:
    """Recently computed sequences' caches, reused by prompts that start with them.

    Args:
        max_bytes: The bound on what is kept, counted as ``tokens * per_token``.
        per_token: Bytes a cached token costs (agreed by all ranks: the largest).
    """

    def __init__(self, max_bytes: int, per_token: int) -> None:
        self.max_bytes = max_bytes
        self.per_token = max(per_token, 1)
        self._entries: OrderedDict[tuple[int, ...], list[Any]] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(len(t) for t in self._entries) * self.per_token

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The stored sequence sharing the longest prefix with ``prompt``, and
        that length (at most ``len(prompt) - 1``: the last prompt token is
        always computed, its logits are the first sample)."""
        best, length = None, 0
        for tokens in self._entries:
            n = _common(tokens, prompt, len(prompt) - 1)
            if n > length:
                best, length = tokens, n
        return best, length

    def take(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A copy of the cache holding the longest stored prefix of ``prompt``,
        cut back to that prefix, and its length; ``(None, 0)`` without one."""
        best, length = self.match(prompt)
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        cache = copy.deepcopy(self._entries[best])
        for c in cache:
            c.trim(c.offset - length)
        self.hits += 1
        self.reused_tokens += length
        return cache, length

    def put(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep ``cache``, which holds ``tokens`` (or more: the excess is cut),
        evicting the least recently used until under the bound."""
        held = min(c.offset for c in cache)
        n = min(held, len(tokens))
        if n < 1 or n * self.per_token > self.max_bytes:
            return
        for c in cache:
            c.trim(c.offset - n)
        key = tuple(tokens[:n])
        self._entries.pop(key, None)
        self._entries[key] = [_compact(c) for c in cache]
        mx.eval([c.state for c in self._entries[key] if getattr(c, "keys", None) is not None])
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


def _common(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n


def _compact(c: Any) -> Any:
    """A cache holding exactly its tokens: the buffers' spare room is dropped."""
    keys = getattr(c, "keys", None)
    if type(c).__name__ != "KVCache" or not isinstance(keys, mx.array):
        return c
    out = copy.copy(c)
    out.keys = mx.contiguous(keys[..., : c.offset, :])
    out.values = mx.contiguous(c.values[..., : c.offset, :])
    return out
