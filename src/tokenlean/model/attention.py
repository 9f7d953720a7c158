"""Attention over the KV cache, and the one place a cache policy hooks into the forward.

`attend` writes a layer's new keys/values into the cache and attends over what the
layer holds. A cache policy (tokenlean.kv) on the cache may

- `attend(...)`: replace the attention of a layer (sparse selection: TokenSelect,
  Quest pages, InfLLM blocks), returning None to fall back to the dense path;
- `after_attention(layer, q, kv, cache)`: read the post-RoPE queries and the layer's
  keys right after its attention and evict (SnapKV at prefill, H2O every step).

With no policy the cost is one attribute check per layer.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=8)
def causal_mask(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) the default mask among T new tokens, one object per size: `dense` knows it by
    identity and then runs the fused causal kernel (an explicit (T, T) bool mask takes
    torch's slower masked path: ~1.6x the prefill time at 4K tokens)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def expand_mask(mask: torch.Tensor | None, T: int, cached: int) -> torch.Tensor | None:
    """A mask over the T new tokens (..., T, T) widened to (..., T, cached + T) with every
    cached slot visible; a mask already that wide is returned as is."""
    if mask is None or mask.shape[-1] == cached + T:
        return mask
    if mask.shape[-1] != T:
        raise ValueError(f"mask of width {mask.shape[-1]}: expected {T} (new tokens) or "
                         f"{cached + T} (cached + new)")
    seen = mask.new_ones((*mask.shape[:-1], cached))
    return torch.cat((seen, mask), dim=-1)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, group: int = 1):
    """(B, H?, T, S) True where the key lies inside the query's sliding window; None
    without a window. q_pos: (B, T); k_pos: (B, S), or (B, H_kv, S) per KV head, then
    repeated for each of its `group` query heads."""
    if not window:
        return None
    if k_pos.dim() == 3:
        inside = k_pos[:, :, None, :] > q_pos[:, None, :, None] - window
        return inside.repeat_interleave(group, dim=1)
    return (k_pos[:, None, :] > q_pos[:, :, None] - window)[:, None]


def sdpa(q, k, v, mask):
    """q (B, H, T, D) over k, v (B, H_kv, S, D); mask bool (..., T, S) or None."""
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]  # (B, 1, T, S) broadcasts over heads
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


def combine(*masks):
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def dense(q, k_new, v_new, cache, layer: int, mask, window) -> torch.Tensor:
    """Write the new entries, attend over the layer's slots (ragged layers head by head)."""
    kv = cache.layers[layer]
    T = k_new.shape[2]
    kv.write(k_new, v_new, cache.new_pos)
    if kv.uniform:
        k, v = kv.view()
        if T > 1 and mask is causal_mask(T, q.device) and k.shape[2] == T and not window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        full = expand_mask(mask, T, k.shape[2] - T)
        if window and k.shape[2] > 1:
            k_pos = kv.positions() if kv.own_pos is not None else cache.pos[:, : k.shape[2]]
            full = combine(full if full is None or full.dim() != 3 else full[:, None],
                           window_mask(cache.new_pos, k_pos, window, q.shape[1] // kv.heads))
        return sdpa(q, k, v, full)
    group = q.shape[1] // kv.heads
    outs = []
    for h in range(kv.heads):
        k, v, pos = kv.head(h)  # (B, n_h, D), the T new ones last
        head_mask = combine(expand_mask(mask, T, kv.lens[h] - T),
                            window_mask(cache.new_pos, pos, window))
        outs.append(sdpa(q[:, h * group : (h + 1) * group], k[:, None], v[:, None], head_mask))
    return torch.cat(outs, dim=1)


def attend(q, k, v, cache, layer: int, mask, window: int | None) -> torch.Tensor:
    """(B, H, T, D) attention output of T new queries; the new keys/values join the cache."""
    if cache is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return sdpa(q, k, v, mask)
    policy = cache.policy
    out = None if policy is None else policy.attend(q, k, v, cache, layer, mask)
    if out is None:
        out = dense(q, k, v, cache, layer, mask, window)
    if policy is not None:
        policy.after_attention(layer, q, cache.layers[layer], cache)
    return out
