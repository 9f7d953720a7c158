"""GemFilter: "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with
1000x Input Token Reduction" (Shi et al., arXiv 2409.17422).

Early layers already find the input tokens a long prompt's answer needs. The prompt
runs through layers 0..r only (the filter layer r, ~40 % of the depth) on a throwaway
cache; the last query's q·k at layer r, summed over all heads and average-pooled,
scores every input token; the top k tokens (the last one always among them) are kept
in their original order, and the full model re-runs on those k tokens alone.

RoPE convention: positions re-indexed. The selected tokens get fresh positions
0..k-1, so the cache holds k entries rotated at 0..k-1 and decoding continues at
position k: `cache.seen` stays T (the tokens the sequence has seen) and
`cache.shift = T - k`, so `next_position = seen - shift = k`. Nothing changes while
decoding, so drafting composes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenlean.errors import UserError
from tokenlean.kv.policies.snapkv import pool
from tokenlean.kv.policy import CachePolicy


class GemFilter(CachePolicy):
    name = "gemfilter"
    summary = "prefill: layers 0..r pick the input tokens, the full model re-runs on them"
    paper = "GemFilter (arXiv 2409.17422)"
    decode_time = False

    @dataclass
    class Params:
        layer: float = 0.4  # filter layer r: a fraction of the depth, or (>= 1) its index
        kernel: int = 5  # average-pooling width over the token scores (1: none)
        softmax: bool = False  # per-head softmax(q·k) instead of q·k (the authors rank by q·k)

    def __init__(self, budget, params=None):
        super().__init__(budget, params)
        self.r: int | None = None  # the filter layer, resolved against the model's depth
        self.selected: torch.Tensor | None = None  # (k,) the input tokens kept, ascending
        self._capture: dict | None = None  # set while the filter pass runs
        self._rerun = False  # the full model running on the selection

    def filter_layer(self, n_layers: int) -> int:
        value = self.params.layer
        if value < 1:
            r = min(round(value * n_layers), n_layers - 1)
        elif value == int(value):
            r = int(value)
        else:
            raise UserError(f"kv policy 'gemfilter': layer={value:g} must be a fraction "
                            f"below 1 or a whole layer index")
        if not 0 <= r < n_layers:
            raise UserError(f"kv policy 'gemfilter': layer={value:g} is outside the model's "
                            f"{n_layers} layers")
        return r

    def prefill(self, model, cache, prompt, room):
        B, T = prompt.shape
        if B != 1:
            raise UserError("kv policy 'gemfilter' runs one sequence at a time (batch 1)")
        self.r = self.filter_layer(model.config.num_hidden_layers)
        k = self.budget.tokens(T)
        if k >= T:  # nothing to filter: the plain prefill, token for token
            self.selected = torch.arange(T)
            return super().prefill(model, cache, prompt, room)

        # 1. the filter pass: layers 0..r on a throwaway cache, layer r's q and keys caught
        q_last, keys = self.filter_pass(model, prompt)
        # 2. one score per input token; the top k, the last token always kept, in order
        scores = self.token_scores(q_last, keys)  # (T,)
        scores[-1] = float("inf")  # the next token is predicted from the last one
        self.selected = scores.topk(k).indices.sort().values.cpu()
        # 3. the full model on the k selected tokens, fresh positions 0..k-1
        self.bind(cache, T, room)
        self._rerun = True
        try:
            logits = model(prompt[:, self.selected.to(prompt.device)], cache=cache,
                           last_n=1)[0, -1]
        finally:
            self._rerun = False
        # the sequence has seen T tokens; the next one goes to position k
        cache.seen += T - k
        cache.shift += T - k
        return logits

    def filter_pass(self, model, prompt):
        """Layer r's post-RoPE query of the last token (H, D) and keys (H_kv, T, D)."""
        tmp = model.new_cache(prompt.shape[1])
        tmp.policy = self
        self._capture = {}
        try:
            model(prompt, cache=tmp, stop_after=self.r)
            return self._capture["q"], self._capture["keys"]
        finally:
            self._capture = None

    def token_scores(self, q_last: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(T,) the last query's q·k / sqrt(D) over the T keys, summed over all heads
        (each query head against its KV head), average-pooled over `kernel` neighbours."""
        H, D = q_last.shape
        H_kv, T = keys.shape[0], keys.shape[1]
        q = q_last.float().view(H_kv, H // H_kv, D)  # (H_kv, G, D): a KV head's query group
        logits = torch.einsum("hgd,hnd->hgn", q, keys.float()) / math.sqrt(D)  # (H_kv, G, T)
        if self.params.softmax:
            logits = logits.softmax(dim=-1)
        scores = logits.sum(dim=(0, 1))  # (T,)
        return pool(scores.view(1, 1, T), self.params.kernel).view(T)

    def after_attention(self, layer, q, kv, cache) -> None:
        if self._capture is not None:  # the filter pass
            if layer == self.r:
                self._capture["q"] = q[0, :, -1].clone()  # (H, D)
                self._capture["keys"] = kv.view()[0][0].clone()  # (H_kv, T, D)
            kv.truncate(kv.length)  # this layer of the throwaway cache is done with:
            kv.shrink(0)  # at most one layer of it is held at a time
        elif self._rerun:  # the re-run: this layer holds k entries, give back the rest
            kv.shrink(self.room)

    def info(self, cache) -> dict:
        out = super().info(cache)
        if self.selected is not None:
            out.update(gemfilter_layer=self.r, kv_selected_tokens=len(self.selected))
        return out
