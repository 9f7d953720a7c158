"""CachePolicy: what a KV-cache compression or sparse-attention method implements.

A policy is made per generation (it holds that sequence's state: H2O's accumulated
scores, TokenSelect's last selection) and hooks in at three places:

- `prefill(model, cache, prompt, room)`: feed the prompt; the default is one forward,
  during which `after_attention` sees every layer with `self.prefilling` True.
  GemFilter overrides it (early layers select, the full model re-runs).
- `attend(q, k, v, cache, layer, mask)`: replace a layer's attention (sparse
  selection); None keeps the dense path (model.attention.dense).
- `after_attention(layer, q, kv, cache)`: the post-RoPE queries of the tokens just
  fed and the layer's keys (kv: model.cache.LayerKV), right after its attention:
  score and evict here. Memory comes back with `kv.shrink(room)`.

Most policies only implement `score` (ScorePolicy): one score per cached entry and
KV head, top-k kept at prefill, like kvpress's `score(module, hidden_states, keys,
values, attentions) -> (B, H_kv, T)`.

Class attributes declare what a policy does, so combinations are checked up front:
`decode_time` (changes the cache or the attention while decoding: drafting could
not stay exact, so it is refused) and `beyond_context` (runs past the model's
trained context: positions re-indexed inside the cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenlean.errors import UserError


@dataclass(frozen=True)
class Budget:
    """A fraction of the prompt (0 < b <= 1) or a number of entries (an integer > 1)."""

    value: float

    @classmethod
    def parse(cls, text: str | float | int | None) -> Budget:
        if text is None:
            return cls(1.0)
        if isinstance(text, Budget):
            return text
        raw = str(text).strip()
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise UserError(f"kv budget {raw!r} must be a fraction (0.25), a percentage "
                            "(25%) or a number of tokens (512)") from None
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"kv budget {raw!r} must be above 0")
        if value > 1 and value != int(value):
            raise UserError(f"kv budget {raw!r}: above 1 it counts tokens, so it must be "
                            "a whole number")
        return cls(value)

    @property
    def is_fraction(self) -> bool:
        return self.value <= 1

    def tokens(self, n: int) -> int:
        """Entries kept out of n."""
        if self.is_fraction:
            return n if self.value == 1 else max(1, math.ceil(self.value * n))
        return min(n, int(self.value))

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else str(int(self.value))


class CachePolicy:
    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    decode_time: ClassVar[bool] = False
    beyond_context: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, budget: Budget, params=None):
        self.budget = budget
        self.params = params if params is not None else self.Params()
        self.prefilling = False
        self.room = 0  # free slots each head keeps after compression (what decoding needs)
        self.prompt_len = 0

    # --- hooks ------------------------------------------------------------------------------

    def prefill(self, model, cache, prompt: torch.Tensor, room: int) -> torch.Tensor:
        """Feed the (1, T) prompt with this policy on the cache; return the last logits."""
        self.bind(cache, prompt.shape[1], room)
        self.prefilling = True
        try:
            logits = model(prompt, cache=cache, last_n=1)[0, -1]
        finally:
            self.prefilling = False
        return logits

    def bind(self, cache, prompt_len: int, room: int) -> None:
        cache.policy = self
        self.prompt_len, self.room = prompt_len, room

    def attend(self, q, k, v, cache, layer: int, mask):
        return None

    def after_attention(self, layer: int, q: torch.Tensor, kv, cache) -> None:
        pass

    # --- reporting --------------------------------------------------------------------------

    def kept(self) -> int:
        """Entries per head this policy aims to keep of the prompt."""
        return self.budget.tokens(self.prompt_len)

    def info(self, cache) -> dict:
        return {"kv_policy": self.name, "kv_budget": str(self.budget),
                "kv_bytes": cache.nbytes(), "kv_bytes_allocated": cache.nbytes(allocated=True)}


class ScorePolicy(CachePolicy):
    """Prefill-time top-k per KV head by `score`; the last `window` entries always stay."""

    window: int = 0  # recent entries kept whatever their score

    def score(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """(B, H_kv, n) importance of each of the n entries. q: (B, H, T, D) the queries of
        the tokens just fed; keys, values: (B, H_kv, n, D), post-RoPE, the last T new."""
        raise NotImplementedError

    def after_attention(self, layer, q, kv, cache) -> None:
        if not self.prefilling:
            return
        n, keep = kv.length, self.kept()
        if keep >= n:
            return
        keys, values = kv.view()
        scores = self.score(layer, q, keys, values)[0]  # (H_kv, n), batch 1
        kv.keep(self.select(scores, keep))
        kv.shrink(self.room)

    def select(self, scores: torch.Tensor, keep: int):
        """Per head, the ascending slots to keep: `keep` each by default."""
        return top_k_with_window(scores, keep, self.window)


def top_k_with_window(scores: torch.Tensor, keep: int, window: int) -> torch.Tensor:
    """(H, keep) ascending slot indices per head: the last `window` slots, plus the
    highest-scoring of the others."""
    H, n = scores.shape
    window = min(window, keep)
    if window:
        scores = scores.clone()
        scores[:, n - window :] = torch.finfo(scores.dtype).max
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def observation_attention(q: torch.Tensor, keys: torch.Tensor, last: int) -> torch.Tensor:
    """(B, H_kv, w, n) softmax attention of the last `last` queries over the n keys,
    causal among them, summed over each KV head's query group (the rule SnapKV, H2O and
    GemFilter read). q: (B, H, T, D) with its T tokens the last T keys."""
    B, H, T, D = q.shape
    H_kv, n = keys.shape[1], keys.shape[2]
    w = min(last, T)
    q = q[:, :, T - w :].float()
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q.view(B, H_kv, H // H_kv, w, D),
                          keys.float()) / math.sqrt(D)
    rows = torch.arange(n - w, n, device=q.device)
    future = torch.arange(n, device=q.device)[None, :] > rows[:, None]  # (w, n)
    logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1).sum(dim=2)  # (B, H_kv, w, n)
