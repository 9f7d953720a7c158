"""TokenSelect: "TokenSelect: Efficient Long-Context Inference and Length Extrapolation
for LLMs via Dynamic Token-Level KV Cache Selection" (Wu et al., arXiv 2411.02886).

Every entry stays in the cache; each decode step attends to a selection of it. Per
layer, each query head's softmax(q·k / sqrt(D)) over the candidate tokens is one soft
vote; the votes are summed over all heads of the layer and the top tokens win, one
index set shared by the layer's heads (token-level selection). The first `initial`
entries and the last `local` ones (the new token among them) are always attended.
The Selection Cache: while the layer's query (flattened over its heads) keeps a
cosine similarity >= `threshold` with the query the selection was computed for, the
stored top tokens are reused and only the local window moves on.

The budget is the number of entries a decode step attends to (a fraction of the
prompt or a count); the prefill is dense. Keys stay rotated at their original
positions. No memory is freed (`frees_memory = False`): the point is less attention
work per step, not a smaller cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy
from tokenlean.model.attention import sdpa


class TokenSelect(CachePolicy):
    name = "tokenselect"
    summary = "decode: each step attends to initial + local + top tokens by per-head soft vote"
    paper = "TokenSelect (arXiv 2411.02886)"
    decode_time = True
    frees_memory = False  # every entry is kept; a selection of them is attended

    @dataclass
    class Params:
        initial: int = 4  # first entries always attended (attention sinks)
        local: int = 32  # last entries always attended (the new token among them)
        threshold: float = 0.9  # query cosine similarity from which a selection is reused

    def __init__(self, budget, params=None):
        super().__init__(budget, params)
        # budget 100 %: attend everything, never select
        self.dense = budget.is_fraction and budget.value == 1
        self.q_cache: dict[int, torch.Tensor] = {}  # layer -> (H*D,) query of its selection
        self.topk_cache: dict[int, torch.Tensor] = {}  # layer -> (k,) the selected middle
        self.reused = self.computed = 0
        self.last: dict[int, torch.Tensor] = {}  # layer -> (n_sel,) slots the last step read

    def prefill(self, model, cache, prompt, room):
        if prompt.shape[0] != 1:
            raise UserError("kv policy 'tokenselect' runs one sequence at a time (batch 1)")
        if model.config.sliding_window:
            raise UserError("kv policy 'tokenselect' does not support sliding-window models")
        return super().prefill(model, cache, prompt, room)

    def attended(self) -> int:
        """Entries each decode step attends to: a fraction of the prompt, or a count (not
        capped at the prompt: the cache grows while decoding)."""
        if self.budget.is_fraction:
            return self.budget.tokens(self.prompt_len)
        return int(self.budget.value)

    def split(self) -> tuple[int, int, int]:
        """(initial, top-k, local) counts that fill the budget; the new token always in."""
        n_sel = self.attended()
        n_init = min(self.params.initial, n_sel - 1)
        n_local = max(1, min(self.params.local, n_sel - n_init))
        return n_init, n_sel - n_init - n_local, n_local

    def attend(self, q, k, v, cache, layer, mask):
        kv = cache.layers[layer]
        if self.dense or q.shape[2] != 1 or mask is not None:
            return None  # prefill, a fed question of several tokens: dense
        if kv.length + 1 <= self.attended():
            return None  # everything fits the budget
        kv.write(k, v, cache.new_pos)  # every entry is kept
        keys, values = kv.view()  # (1, H_kv, n, D)
        index = self.select(layer, q, keys)  # (n_sel,) ascending slots
        self.last[layer] = index
        return sdpa(q, keys[:, :, index], values[:, :, index], None)  # over (1, H_kv, n_sel, D)

    def select(self, layer: int, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(n_sel,) slots: the first n_init, the top-k middle tokens by soft vote (or the
        stored ones while the query stays similar), the last n_local."""
        n = keys.shape[2]
        n_init, topk, n_local = self.split()
        fingerprint = q[0, :, 0].flatten().float()  # (H*D,) this step's query of the layer
        stored = self.q_cache.get(layer)
        if stored is not None and float(F.cosine_similarity(fingerprint, stored, dim=0)) \
                >= self.params.threshold:
            middle = self.topk_cache[layer]  # still below the moved local window
            self.reused += 1
        else:
            middle = n_init + soft_vote(q, keys[:, :, n_init : n - n_local]).topk(topk).indices
            middle = middle.sort().values
            self.q_cache[layer], self.topk_cache[layer] = fingerprint, middle
            self.computed += 1
        device = keys.device
        return torch.cat((torch.arange(n_init, device=device), middle.to(device),
                          torch.arange(n - n_local, n, device=device)))

    def info(self, cache) -> dict:
        out = super().info(cache)
        steps = self.reused + self.computed
        out.update(kv_attended=self.attended(), kv_frees_memory=self.frees_memory,
                   kv_selection_reuse_rate=round(self.reused / steps, 4) if steps else 0.0)
        return out


def soft_vote(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(m,) per query head softmax(q·k / sqrt(D)) over the m candidate keys, summed over all
    H heads (each against its KV head). q: (1, H, 1, D); keys: (1, H_kv, m, D)."""
    _, H, _, D = q.shape
    H_kv = keys.shape[1]
    grouped = q[0, :, 0].float().view(H_kv, H // H_kv, D)  # (H_kv, G, D)
    logits = torch.einsum("hgd,hmd->hgm", grouped, keys[0].float()) / math.sqrt(D)
    return logits.softmax(dim=-1).sum(dim=(0, 1))  # (m,)
