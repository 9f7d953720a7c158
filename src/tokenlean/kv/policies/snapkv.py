"""SnapKV: "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al.,
arXiv 2404.14469).

At prefill, each KV head keeps the entries that the prompt's last `window` queries
(the observation window) attend to most: their softmax attention, averaged over the
window and the head's query group, smoothed by average pooling (`kernel`), top-k,
plus the window itself. Keys stay rotated at their original positions. Decoding
then appends to the compressed cache as usual, so drafting composes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenlean.kv.policy import ScorePolicy, observation_attention


class SnapKV(ScorePolicy):
    name = "snapkv"
    summary = "prefill: per-head top-k by the observation window's pooled attention"
    paper = "SnapKV (arXiv 2404.14469)"

    @dataclass
    class Params:
        window: int = 64  # observation window: the last queries of the prompt (kvpress's 64)
        kernel: int = 5  # average-pooling width over the scores

    @property
    def window(self) -> int:
        return self.params.window

    def score(self, layer, q, keys, values):
        attn = observation_attention(q, keys, self.params.window)  # (B, H_kv, w, n)
        group = q.shape[1] // keys.shape[1]
        scores = attn.mean(dim=2) / group  # (B, H_kv, n): mean over window and group
        # pooled over the entries before the window only (the window itself always stays)
        w = attn.shape[2]
        before = pool(scores[..., : scores.shape[-1] - w], self.params.kernel)
        return torch.cat((before, scores[..., before.shape[-1] :]), dim=-1)


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the entries, same length (SnapKV's clustering of neighbours)."""
    if kernel <= 1:
        return scores
    B, H, n = scores.shape
    # zero-padded at the ends, as SnapKV's reference code and kvpress pool
    pooled = F.avg_pool1d(scores.reshape(B * H, 1, n), kernel, stride=1, padding=kernel // 2)
    return pooled.view(B, H, -1)[..., :n]
