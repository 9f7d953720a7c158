"""DuoAttention / LServe: "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads" (Xiao et al., arXiv 2410.10819) with the page selection
of "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention" (Yang
et al., arXiv 2502.14866).

Each KV head of each layer is a streaming head or a retrieval head. A streaming head
keeps the `sinks` first entries and the `recent` last ones: after prefill its segment
of the (ragged) cache is cut to that and reallocated, so the memory really comes back.
It is given room for one page of new entries, not for the whole generation: when a
forward would overflow it, it is cut back to sinks + recent first (and reallocated only
when a forward brings more tokens than that frees, as a long question does).
A retrieval head keeps everything and, at each decode step, attends only to the top
pages (of `page` tokens) by the Quest bound: per page and channel i the min m_i and
max M_i of its keys, page score = sum_i max(q_i*m_i, q_i*M_i) (summed over the KV
head's query group), as many pages as `budget` tokens allow, the current page always.

The split comes from a calibration run (tokenlean.kv.calibrate): the `retrieval` share
of all heads with the highest scores are retrieval heads. Prefill attends densely in
every head. Keys stay rotated at their original positions. Budget 1.0: the identity
(every head a retrieval head, no page selection, no calibration needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.errors import UserError
from tokenlean.kv.calibrate import load_or_calibrate, retrieval_heads
from tokenlean.kv.policy import CachePolicy
from tokenlean.model.attention import combine, expand_mask, sdpa


class DuoAttention(CachePolicy):
    name = "duo"
    summary = "streaming heads (sinks + recent, freed) and retrieval heads (Quest pages)"
    paper = "DuoAttention (arXiv 2410.10819) / LServe (arXiv 2502.14866)"
    decode_time = True

    @dataclass
    class Params:
        sinks: int = 4  # first entries a streaming head keeps
        recent: int = 256  # last entries a streaming head keeps
        page: int = 16  # tokens per page of a retrieval head
        retrieval: float = 0.5  # share of heads kept as retrieval heads
        calibration: str = ""  # calibration JSON; "" = <TOKENLEAN_HOME>/kv-calibration/

    def __init__(self, budget, params=None):
        super().__init__(budget, params)
        p = self.params
        if p.sinks < 0 or p.recent < 1 or p.page < 1 or not 0 <= p.retrieval <= 1:
            raise UserError("kv policy 'duo': sinks >= 0, recent >= 1, page >= 1 and "
                            "0 <= retrieval <= 1")
        self.retrieval: torch.Tensor | None = None  # (L, H_kv) bool
        self.heads: list[list[bool]] = []  # the same as lists, read every layer and step
        self.pages: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.selected: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) -> pages

    @property
    def identity(self) -> bool:
        return self.budget.is_fraction and self.budget.value == 1

    def prefill(self, model, cache, prompt, room):
        if prompt.shape[0] != 1:
            raise UserError("kv policy 'duo' runs batch size 1")
        if not self.identity:
            p = self.params
            scores = load_or_calibrate(model, p.calibration, p.sinks, p.recent)["scores"]
            self.retrieval = retrieval_heads(scores, p.retrieval)
            self.heads = self.retrieval.tolist()
        return super().prefill(model, cache, prompt, room)

    def streaming_slots(self, n: int) -> torch.Tensor:
        sinks, recent = self.params.sinks, self.params.recent
        return torch.cat((torch.arange(min(sinks, n)), torch.arange(max(sinks, n - recent), n)))

    def after_attention(self, layer, q, kv, cache) -> None:
        if self.identity:
            return
        p, heads = self.params, self.heads[layer]
        cap = p.sinks + p.recent + (0 if self.prefilling else p.page)  # lazy while decoding
        if not all(heads) and any(n > cap for n, r in zip(kv.lens, heads) if not r):
            kv.keep([torch.arange(n) if r else self.streaming_slots(n)
                     for n, r in zip(kv.lens, heads)])
        if self.prefilling and not all(heads):  # streaming heads: sinks + recent + a page
            kv.shrink([self.room if r else min(self.room, p.page) for r in heads])
        if self.prefilling:
            for h in (h for h, r in enumerate(heads) if r):
                self.update_pages(layer, h, kv.head(h)[0][0])

    # --- decoding -----------------------------------------------------------------------

    def attend(self, q, k, v, cache, layer, mask):
        if self.identity or self.prefilling:
            return None
        kv = cache.layers[layer]
        self.make_room(layer, kv, k.shape[2])
        kv.write(k, v, cache.new_pos)
        T, group, p = k.shape[2], q.shape[1] // kv.heads, self.params
        q_pos = cache.new_pos  # (B, T)
        outs = []
        for h in range(kv.heads):
            keys, values, pos = kv.head(h)  # (B, n_h, D), (B, n_h): the T new last
            qh = q[:, h * group : (h + 1) * group]  # (B, g, T, D)
            head_mask = expand_mask(mask, T, keys.shape[1] - T)
            if self.heads[layer][h]:
                self.update_pages(layer, h, keys[0])
                if T == 1:
                    slots = self.select(layer, h, qh[0, :, 0], keys.shape[1])
                    if slots is not None:
                        keys, values = keys[:, slots], values[:, slots]
            else:  # sinks and the recent window of each query
                near = q_pos[:, :, None] - pos[:, None, :] < p.recent  # (B, T, n_h)
                head_mask = combine(head_mask, near | (pos < p.sinks)[:, None])
            outs.append(sdpa(qh, keys[:, None], values[:, None], head_mask))
        return torch.cat(outs, dim=1)

    def make_room(self, layer: int, kv, T: int) -> None:
        """Before T new entries are written: a streaming head without room for them is cut
        to sinks + recent (all the new queries can see) and, if that is still too few
        slots, the layer reallocated with room for T (a retrieval head keeps its room)."""
        heads = self.heads[layer]
        short = [not r and n + T > cap for n, cap, r in zip(kv.lens, kv.caps, heads)]
        if not any(short):
            return
        kv.keep([self.streaming_slots(n) if cut else torch.arange(n)
                 for n, cut in zip(kv.lens, short)])
        if any(n + T > cap for n, cap in zip(kv.lens, kv.caps)):
            kv.shrink([cap - n if r else max(T, self.params.page)
                       for n, cap, r in zip(kv.lens, kv.caps, heads)])

    def update_pages(self, layer: int, h: int, keys: torch.Tensor) -> None:
        """Per-page, per-channel min and max of a retrieval head's keys (n, D), brought
        up to date: only the pages touched since the last call are recomputed."""
        n, page = keys.shape[0], self.params.page
        lo, hi, done = self.pages.get((layer, h), (keys[:0], keys[:0], 0))
        first = done // page
        rows = [keys[s : s + page] for s in range(first * page, n, page)]
        new_lo = torch.stack([r.amin(0) for r in rows]) if rows else keys[:0]
        new_hi = torch.stack([r.amax(0) for r in rows]) if rows else keys[:0]
        self.pages[layer, h] = (torch.cat((lo[:first], new_lo)), torch.cat((hi[:first], new_hi)), n)

    def select(self, layer: int, h: int, q: torch.Tensor, n: int) -> torch.Tensor | None:
        """Slots of the top pages by the Quest bound for the group's queries q (g, D);
        None when the budget covers every page."""
        lo, hi, _ = self.pages[layer, h]  # (P, D)
        page, P = self.params.page, lo.shape[0]
        chosen = max(1, self.budget.tokens(n) // page)
        if chosen >= P:
            return None
        bound = torch.maximum(q[:, None] * lo[None], q[:, None] * hi[None]).sum(dim=(0, 2))
        bound[-1] = float("inf")  # the current page always
        top = bound.topk(chosen).indices.sort().values  # (chosen,)
        self.selected[layer, h] = top
        slots = (top[:, None] * page + torch.arange(page, device=top.device)).flatten()
        return slots[slots < n]

    def info(self, cache) -> dict:
        out = super().info(cache)
        if self.retrieval is not None:
            out["kv_retrieval_heads"] = int(self.retrieval.sum())
            out["kv_streaming_heads"] = int((~self.retrieval).sum())
        return out
