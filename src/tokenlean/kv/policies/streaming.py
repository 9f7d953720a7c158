"""StreamingLLM: "Efficient Streaming Language Models with Attention Sinks" (Xiao et al.,
arXiv 2309.17453).

The cache holds the first `sinks` tokens (the attention sinks) and a window of the
most recent ones: `budget` entries per KV head in all. Whenever a layer holds more
(during prefill, fed in chunks of budget/2 tokens, and during decoding) the oldest
non-sink entries go, `evict_every` at a time (at most a quarter of the budget) so the
re-rotation below is paid once per chunk, not once per token.

RoPE convention: positions are the cache slots (StreamingLLM's rule). Keys are stored
rotated at their slot; when an eviction moves an entry from slot p to slot s, its key
is re-rotated by s - p (`rotate`), its stored position becomes s, and `cache.shift`
grows by the number evicted, so the next token's position `seen - shift` is the number
of slots held. Positions so never pass budget + budget/2: generation runs far beyond
the trained context. Every layer evicts the same count in the same step (lock-step).

Budget: a token count is the cache size; a fraction is that share of the prompt, and
1.0 is the model's context (a prompt and answer that fit never see an eviction: the
plain cache, token for token). Memory is really budget-sized: each layer is allocated
budget + one chunk of free slots, and shrunk to budget + 1 once the prompt is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy
from tokenlean.model.cache import rotate


class StreamingLLM(CachePolicy):
    name = "streaming"
    summary = "attention sinks + recent window, positions re-indexed to cache slots"
    paper = "StreamingLLM (arXiv 2309.17453)"
    decode_time = True
    beyond_context = True

    @dataclass
    class Params:
        sinks: int = 4  # initial tokens always kept (the attention sinks)
        evict_every: int = 64  # entries evicted at once, amortising the re-rotation

    def __init__(self, budget, params=None):
        super().__init__(budget, params)
        if self.params.sinks < 0 or self.params.evict_every < 1:
            raise UserError("kv policy 'streaming': sinks must be >= 0, evict_every >= 1")
        self.size = 0  # entries per head the cache holds at most (sinks + recent)
        self.chunk = 1  # prefill chunk length
        self.inv_freq = None

    def bind(self, cache, prompt_len, room, context: int | None = None) -> None:
        """`context`: the model's trained context, the cache size at budget 1.0."""
        super().bind(cache, prompt_len, room)
        self.inv_freq = cache.inv_freq
        if self.budget.value == 1:
            self.size = max(context or prompt_len, 1)
        elif self.budget.is_fraction:
            self.size = self.budget.tokens(prompt_len)
        else:
            self.size = int(self.budget.value)
        self.chunk = max(1, self.size // 2)

    def prefill(self, model, cache, prompt, room):
        """Feed the prompt in one forward if it fits the budget, else in chunks."""
        if prompt.shape[0] != 1:
            raise UserError("kv policy 'streaming' runs batch size 1")
        self.bind(cache, prompt.shape[1], room, model.config.max_position_embeddings)
        T = prompt.shape[1]
        step = T if T <= self.size else self.chunk
        self.prefilling = True
        try:
            for start in range(0, T, step):
                logits = model(prompt[:, start : start + step], cache=cache, last_n=1)
        finally:
            self.prefilling = False
        for kv in cache.layers:  # decoding adds one entry at a time
            self.fit(kv, self.capacity())
        return logits[0, -1]

    # --- the rule ---------------------------------------------------------------------------

    @property
    def sinks(self) -> int:
        return min(self.params.sinks, self.size - 1)

    @property
    def target(self) -> int:
        """Entries left after an eviction: the budget less one eviction chunk."""
        evict = min(self.params.evict_every, max(1, self.size // 4))
        return max(self.size - evict, self.sinks + 1)

    def capacity(self) -> int:
        """Slots per head: the budget plus what one forward may add before it evicts."""
        return self.size + (self.chunk if self.prefilling else 1)

    def attend(self, q, k, v, cache, layer, mask):
        kv, T = cache.layers[layer], k.shape[2]
        if kv.k is None:  # first write: allocate budget-sized, not prompt + answer
            kv.caps = [min(kv.caps[0], max(self.capacity(), T))] * kv.heads
        elif kv.length + T > min(kv.caps):
            kv.shrink(T)  # a forward longer than planned (a question): room for it
        return None

    def after_attention(self, layer, q, kv, cache) -> None:
        n = kv.length
        if n > self.size:
            self.evict(kv, n - self.target)
            if layer == len(cache.layers) - 1:  # once per step, after the last layer
                cache.shift += n - self.target
        self.fit(kv, self.capacity())

    def evict(self, kv, dropped: int) -> None:
        """Drop the `dropped` oldest non-sink entries of every head; the recent ones move
        down to the slots after the sinks, their keys re-rotated to them."""
        s, n = self.sinks, kv.length
        kept = torch.cat((torch.arange(s), torch.arange(s + dropped, n)))  # (target,)
        kv.keep(kept)
        keys, _ = kv.view()  # (B, H_kv, target, D), a view of the storage
        recent = keys[:, :, s:]
        delta = torch.full((recent.shape[2],), -dropped, device=keys.device)
        recent.copy_(rotate(recent.float(), delta, self.inv_freq).to(recent.dtype))
        kv.positions().copy_(torch.arange(kv.length, device=keys.device))  # positions = slots

    @staticmethod
    def fit(kv, cap: int) -> None:
        """Reallocate down to `cap` slots per head if the layer holds more (so only when
        the plan changes: prefill -> decoding, or after a long forward)."""
        if kv.k is not None and kv.caps[0] > cap and kv.length < cap:
            kv.shrink(cap - kv.length)
