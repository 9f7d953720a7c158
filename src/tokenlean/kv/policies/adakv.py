"""AdaKV on SnapKV's scores: "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference" (Feng et al., arXiv 2407.11550).

A layer's budget is `H_kv * k` entries, shared between its KV heads: the top
`H_kv * k` scores over all heads of the layer win, with every head guaranteed an
`alpha` share of k (the safeguard). Heads then hold different numbers of entries,
stored ragged and reallocated to exactly what they hold: the memory is really saved
(kvpress masks the dropped keys instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.kv.policies.snapkv import SnapKV


class AdaKV(SnapKV):
    name = "adakv"
    summary = "prefill: SnapKV scores, budget shared between a layer's heads (ragged)"
    paper = "Ada-KV (arXiv 2407.11550) on SnapKV"

    @dataclass
    class Params(SnapKV.Params):
        alpha: float = 0.2  # share of the per-head budget every head keeps

    def select(self, scores, keep):
        return adaptive_selection(scores, keep, self.params.window, self.params.alpha)


def adaptive_selection(scores: torch.Tensor, keep: int, window: int, alpha: float) -> list[torch.Tensor]:
    """Per head, ascending slots: the window, each head's top alpha*keep, then the best
    of the rest over all heads until the layer holds H * keep entries."""
    H, n = scores.shape
    scores = scores.clone()
    top = torch.finfo(scores.dtype).max
    window = min(window, keep)
    if window:
        scores[:, n - window :] = top
    floor = max(window, min(keep, int(alpha * keep)))
    guaranteed = scores.topk(floor, dim=-1).indices  # (H, floor)
    scores.scatter_(1, guaranteed, top)
    flat = scores.flatten().topk(H * keep).indices  # the layer's budget, any head
    heads, slots = flat // n, flat % n
    return [slots[heads == h].sort().values for h in range(H)]
