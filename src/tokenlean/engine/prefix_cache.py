"""Prefix caching: requests that start the same way (a system prompt, a chat history)
reuse the KV entries an earlier request computed for that start.

Prefixes are kept in whole blocks of `block` tokens. Each stored prompt is indexed by
a chained hash at every block boundary, so a lookup walks a new prompt once and finds
the longest stored block-aligned prefix; its entries are copied into the new
sequence's own cache (a copy reads memory once, far less than the forward it saves).
Entries are evicted least recently used first under a byte budget. A sequence with
a cache policy neither stores nor reuses: its cache holds a compressed prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    tokens: list[int]
    keys: list[torch.Tensor]  # per layer (1, H_kv, n, D)
    values: list[torch.Tensor]
    hashes: list[int]  # the chained hash at each block boundary

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def block_hashes(tokens: list[int], block: int) -> list[int]:
    """hashes[j]: the chained hash of tokens[: (j + 1) * block]."""
    out, h = [], 0
    for end in range(block, len(tokens) + 1, block):
        h = hash((h, tuple(tokens[end - block : end])))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # by id, least recent first
        self.index: dict[int, Entry] = {}  # boundary hash -> an entry holding that prefix
        self.nbytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def lookup(self, tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Keys and values of the longest stored prefix of `tokens` that leaves at least one
        token to feed (its logits choose the first new token), or None."""
        hashes = block_hashes(tokens[:-1], self.block)
        for j in range(len(hashes) - 1, -1, -1):
            entry = self.index.get(hashes[j])
            n = (j + 1) * self.block
            if entry is not None and entry.tokens[:n] == tokens[:n]:
                self.entries.move_to_end(id(entry))
                self.hits += 1
                self.reused_tokens += n
                return ([k[:, :, :n] for k in entry.keys], [v[:, :, :n] for v in entry.values])
        self.misses += 1
        return None

    def store(self, tokens: list[int], cache) -> None:
        """Keep the whole blocks of `tokens`, whose entries fill `cache`'s first slots."""
        n = len(tokens) // self.block * self.block
        if n == 0 or self.max_bytes <= 0:
            return
        hashes = block_hashes(tokens[:n], self.block)
        known = self.index.get(hashes[-1])
        if known is not None and known.tokens[:n] == tokens[:n]:
            self.entries.move_to_end(id(known))  # held already
            return
        keys, values = [], []
        for layer in cache.layers:
            k, v = layer.view()  # (1, H_kv, len, D)
            keys.append(k[:, :, :n].clone())
            values.append(v[:, :, :n].clone())
        entry = Entry(list(tokens[:n]), keys, values, hashes)
        if entry.nbytes > self.max_bytes:
            return
        self.entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        for h in hashes:
            self.index[h] = entry
        while self.nbytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        _, entry = self.entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            if self.index.get(h) is entry:
                del self.index[h]
        for other in self.entries.values():  # a prefix they shared stays findable
            for h in other.hashes:
                self.index.setdefault(h, other)
