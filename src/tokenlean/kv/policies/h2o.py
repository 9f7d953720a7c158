"""H2O: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (Zhang et al., arXiv 2306.14048).

Each KV head keeps a fixed budget of entries: the most recent ones (a `recent` share of
the budget) and the heavy hitters, the entries with the highest accumulated attention.
The score of an entry is its attention column sum: the softmax attention every query
fed so far gave it (all prompt queries, causal, then each decode step's), summed over
the head's query group. Whenever a layer holds more than the budget (after the prompt,
then after every new token) the lowest-scored non-recent entries go, the same number
in every head, so layers stay uniform. kvpress's ObservedAttentionPress is the
prefill-only analogue.

RoPE: keys stay rotated at their original positions; the next token's position is the
number of tokens seen. Budget: a token count is the cache size; a fraction is that
share of the prompt (1.0: nothing is ever evicted). The prompt's layer is shrunk once
after prefill to budget + 1 slots, and decoding evicts one entry per new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy, top_k_with_window

QUERY_CHUNK_ELEMENTS = 1 << 24  # attention weights held at once while scoring the prompt


class H2O(CachePolicy):
    name = "h2o"
    summary = "decode-time: heavy hitters by accumulated attention + recent window"
    paper = "H2O (arXiv 2306.14048)"
    decode_time = True

    @dataclass
    class Params:
        recent: float = 0.5  # share of the budget given to the most recent entries

    def __init__(self, budget, params=None):
        super().__init__(budget, params)
        if not 0 <= self.params.recent <= 1:
            raise UserError("kv policy 'h2o': recent must be between 0 and 1")
        self.size: int | None = None  # entries per head kept (None: never evict)
        self.scores: list[torch.Tensor | None] = []  # per layer (H_kv, n), slot-aligned

    def prefill(self, model, cache, prompt, room):
        if prompt.shape[0] != 1:
            raise UserError("kv policy 'h2o' runs batch size 1")
        return super().prefill(model, cache, prompt, room)

    def bind(self, cache, prompt_len, room) -> None:
        super().bind(cache, prompt_len, room)
        if self.budget.value == 1:
            self.size = None
        elif self.budget.is_fraction:
            self.size = self.budget.tokens(prompt_len)
        else:
            self.size = int(self.budget.value)
        self.scores = [None] * len(cache.layers)

    @property
    def recent(self) -> int:
        return min(self.size, round(self.params.recent * self.size))

    def attend(self, q, k, v, cache, layer, mask):
        kv, T = cache.layers[layer], k.shape[2]
        if self.size is not None and kv.k is not None and kv.length + T > min(kv.caps):
            kv.shrink(T)  # a forward longer than one token after prefill (a question)
        return None

    def after_attention(self, layer, q, kv, cache) -> None:
        if self.size is None:
            return  # budget 100 %: the plain cache
        keys, _ = kv.view()  # (B, H_kv, n, D), the T just fed last
        T, n = q.shape[2], keys.shape[2]
        fresh = column_sums(q, keys)  # (H_kv, n)
        old = self.scores[layer]
        scores = fresh if old is None else fresh + torch.cat(
            (old, old.new_zeros(old.shape[0], T)), dim=1)
        if n > self.size:
            index = top_k_with_window(scores, self.size, self.recent)  # (H_kv, size)
            kv.keep(index)
            scores = scores.gather(1, index)
        self.scores[layer] = scores
        cap = max(self.size, kv.length) + 1  # decoding then evicts one per new entry
        if kv.caps[0] > cap:  # once after prefill (or after a long question)
            kv.shrink(cap - kv.length)


def column_sums(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(H_kv, n) attention column sums of the T queries over the n keys (the T queries'
    own keys the last T, causal among them), in fp32, summed over each KV head's query
    group; queries in chunks so the weights held stay bounded. q: (1, H, T, D)."""
    _, H, T, D = q.shape
    H_kv, n = keys.shape[1], keys.shape[2]
    group = H // H_kv
    qg = q[0].float().view(H_kv, group, T, D)
    kT = keys[0].float().transpose(1, 2)  # (H_kv, D, n)
    out = kT.new_zeros(H_kv, n)
    step = max(1, QUERY_CHUNK_ELEMENTS // (H * n))
    cols = torch.arange(n, device=kT.device)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        rows = qg[:, :, t0:t1].reshape(H_kv, -1, D)  # a KV head's queries, (g, t) flattened
        logits = (rows @ kT) / math.sqrt(D)  # (H_kv, g * (t1 - t0), n)
        if t0 < T - 1:  # some of these queries precede some keys: causal mask
            own = torch.arange(n - T + t0, n - T + t1, device=kT.device).repeat(group)
            logits = logits.masked_fill(cols[None, :] > own[:, None], float("-inf"))
        out += logits.softmax(dim=-1).sum(dim=1)
    return out
