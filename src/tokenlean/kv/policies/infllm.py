"""InfLLM: "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient
Context Memory" (Xiao et al., arXiv 2402.04617).

The cache keeps the `initial` tokens and a `local` window; older context moves, in
blocks of `block` tokens, to a block store (host memory when the model is on CUDA).
A block's representative key, per KV head, is the mean of its `representatives` keys
with the highest r_m = sum_j q_{m+j}·k_m (the queries 1..`local` positions after m, fed
while m sat in the local window). Every step (a prefill chunk of `chunk` tokens or a
decode token) each KV head retrieves its own `topk` blocks by q̄·r (q̄: the step's
queries averaged over tokens and the head's query group) and attends over [initial,
retrieved blocks in original order, local window, new tokens].

Retrieval variant (`scoring=max query=last`, ours, not the paper's): a block scores the
best of its representatives instead of their mean, and a step is represented by its last
query. A needle is one or two tokens of its block that nothing in the local window attends
to, so r_m rarely picks it and a mean of keys dilutes it. With `representatives=block` every
key is a representative: the exact best q·k per block, an index as large as the keys. On
tl-code's passkey at 4K it retrieves the needle's block where the paper's rule does not
(BENCHMARKS.md).

RoPE: keys are stored rotated at their original positions, re-rotated at attention time
to their slots in that concatenation (the queries to the last slots): positions stay
below initial + topk*block + local + chunk however long the input. Retrieval is
position-free: representatives and queries are de-rotated to position 0.

Budget: the Params define the method; a token-count budget caps the attended memory
topk*block (topk = budget // block), a fraction is ignored. A prompt that fits in
initial + local is never evicted: the plain path, token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy
from tokenlean.model.attention import expand_mask, sdpa
from tokenlean.model.cache import rotate


class BlockStore:
    """One layer's evicted blocks. Per block: keys, values (B, H_kv, block, D) and
    original positions (block,) on `device`; representative keys (n_blocks, B, H_kv, r, D)
    stay beside the model (the retrieval index, r/block of the size; r = 1 when they are
    scored by their mean)."""

    def __init__(self, device):
        self.device = device
        self.keys, self.values, self.positions = [], [], []  # per block
        self.reps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, k, v, pos, rep) -> None:
        for items, t in ((self.keys, k), (self.values, v), (self.positions, pos)):
            items.append(t.to(self.device, copy=True))  # a copy: the cache's slots get reused
        self.reps = rep[None] if self.reps is None else torch.cat((self.reps, rep[None]))

    def gather(self, chosen: torch.Tensor, device):
        """Per head h the blocks chosen[h] (ascending): keys, values (B, H_kv, k*block, D)
        and positions (H_kv, k*block) on `device`."""
        ks, vs, ps = [], [], []
        for h, blocks in enumerate(chosen.tolist()):
            ks.append(torch.cat([self.keys[b][:, h] for b in blocks], dim=1))
            vs.append(torch.cat([self.values[b][:, h] for b in blocks], dim=1))
            ps.append(torch.cat([self.positions[b] for b in blocks]))
        ks, vs, ps = torch.stack(ks, 1), torch.stack(vs, 1), torch.stack(ps)
        return ks.to(device), vs.to(device), ps.to(device)

    def scores(self, q_bar: torch.Tensor, scoring: str) -> torch.Tensor:
        """(H_kv, n_blocks): q̄ (H_kv, D) against each block's representatives, their mean
        (a dot with the mean key) or their max."""
        dots = torch.einsum("hd,nhrd->hnr", q_bar, self.reps[:, 0].float())
        return dots.amax(dim=-1) if scoring == "max" else dots.mean(dim=-1)

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.positions, *([self.reps] if len(self) else [])]
        return sum(t.nbytes for t in tensors)


class InfLLM(CachePolicy):
    name = "infllm"
    summary = "initial + local window + per-head top-k blocks retrieved from the evicted context"
    paper = "InfLLM (arXiv 2402.04617)"
    decode_time = True
    beyond_context = True

    @dataclass
    class Params:
        initial: int = 64  # first tokens, always attended
        local: int = 512  # local window of the most recent tokens
        block: int = 128  # tokens per memory block
        representatives: int = 4  # keys a block is represented by in retrieval
        scoring: str = "mean"  # mean (the paper: q̄ · their mean) or max (the best of them)
        query: str = "mean"  # q̄: the step's queries averaged (the paper) or its last one
        topk: int = 4  # blocks retrieved per step and KV head
        chunk: int = 512  # prefill chunk size

    CHOICES = {"scoring": ("mean", "max"), "query": ("mean", "last")}

    def __init__(self, budget, params=None):
        super().__init__(budget, params)
        p = self.params
        if min(p.initial, p.local, p.chunk, p.representatives) < 1 or not 0 <= p.topk \
                or p.representatives > p.block:
            raise UserError("kv policy 'infllm': initial, local, chunk and representatives "
                            "must be >= 1, representatives <= block, topk >= 0")
        for name, valid in self.CHOICES.items():
            if getattr(p, name) not in valid:
                raise UserError(f"kv policy 'infllm': {name}={getattr(p, name)!r}; valid: "
                                f"{', '.join(valid)}")
        self.stores: list[BlockStore] = []
        self.scores: list[torch.Tensor | None] = []  # (H_kv, n) r_m per LayerKV slot
        self.selected: dict[int, torch.Tensor] = {}  # layer -> (H_kv, k) last retrieval
        self.max_position = 0  # highest position any attention used

    @property
    def topk(self) -> int:
        p = self.params
        return p.topk if self.budget.is_fraction else min(p.topk, int(self.budget.value) // p.block)

    def bind(self, cache, prompt_len, room) -> None:
        super().bind(cache, prompt_len, room)
        host = "cpu" if cache.device.type == "cuda" else cache.device
        self.stores = [BlockStore(host) for _ in cache.layers]
        self.scores = [None] * len(cache.layers)
        self.inv_freq = cache.inv_freq

    def prefill(self, model, cache, prompt, room):
        """Feed the prompt in chunks (one forward when it fits in initial + local)."""
        if prompt.shape[0] != 1:
            raise UserError("kv policy 'infllm' runs batch size 1")
        self.bind(cache, prompt.shape[1], room)
        p, T = self.params, prompt.shape[1]
        step = T if T <= p.initial + p.local else p.chunk
        for start in range(0, T, step):  # prefill and decoding run the same rule
            logits = model(prompt[:, start : start + step], cache=cache, last_n=1)
        return logits[0, -1]

    def attend(self, q, k, v, cache, layer, mask):
        kv, T = cache.layers[layer], k.shape[2]
        if kv.k is not None and kv.length + T > kv.caps[0]:
            kv.shrink(T)  # a forward longer than a chunk (a question): room for it
        self.max_position = max(self.max_position, kv.length + T - 1)
        if not len(self.stores[layer]):
            return None  # nothing evicted: the plain path, exactly
        kv.write(k, v, cache.new_pos)
        keys, values = kv.view()  # (B, H_kv, n, D): initial, local, the T new
        pos = kv.positions()[0, 0]  # (n,) original positions, the same in every head
        n_init, H = self.params.initial, kv.heads
        chosen = self.retrieve(layer, q, cache.new_pos[0])  # (H_kv, k)
        if chosen.shape[1]:
            mk, mv, mpos = self.stores[layer].gather(chosen, keys.device)
        else:  # topk 0 (a budget under one block): initial + local only
            mk, mv, mpos = keys[:, :, :0], values[:, :, :0], pos[:0].expand(H, 0)
        K = torch.cat((keys[:, :, :n_init], mk, keys[:, :, n_init:]), dim=2)  # (B, H_kv, S, D)
        V = torch.cat((values[:, :, :n_init], mv, values[:, :, n_init:]), dim=2)
        B, _, S, D = K.shape
        slots = torch.arange(S, device=K.device)
        orig = torch.cat((pos[:n_init].expand(H, -1), mpos, pos[n_init:].expand(H, -1)), dim=1)
        delta = (slots - orig).reshape(-1)  # (H_kv * S,) each key to its slot
        K = rotate(K.reshape(B, H * S, D), delta, self.inv_freq).view(B, H, S, D)
        q = rotate(q, slots[S - T :] - cache.new_pos[0], self.inv_freq)  # to the last slots
        self.max_position = max(self.max_position, S - 1)
        return sdpa(q, K, V, expand_mask(mask, T, S - T))

    def retrieve(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """(H_kv, k) ascending block ids: per KV head the top-k blocks by q̄·r."""
        store, (_, H, T, D) = self.stores[layer], q.shape
        H_kv = store.reps.shape[2]
        q0 = rotate(q.float(), -q_pos, self.inv_freq)  # de-rotated to position 0
        q0 = q0[0].view(H_kv, H // H_kv, T, D)
        if self.params.query == "last":
            q0 = q0[:, :, -1:]  # a question's last token asks for the answer
        q_bar = q0.mean(dim=(1, 2))  # (H_kv, D)
        scores = store.scores(q_bar, self.params.scoring)  # (H_kv, blocks)
        chosen = scores.topk(min(self.topk, len(store)), dim=-1).indices.sort(dim=-1).values
        self.selected[layer] = chosen
        return chosen

    def after_attention(self, layer, q, kv, cache) -> None:
        p, (keys, _), T = self.params, kv.view(), q.shape[2]  # keys (B, H_kv, n, D)
        B, H_kv, n, D = keys.shape
        score = self.scores[layer]
        fresh = keys.new_zeros(H_kv, n if score is None else T, dtype=torch.float32)
        score = fresh if score is None else torch.cat((score, fresh), dim=1)  # (H_kv, n)
        n_init = min(p.initial, n)
        pos = kv.positions()[0, 0, n_init:]  # (n_l,)
        # r_m += q_{m+j}·k_m for the new queries j = 1..local positions after m
        qg = q[0].float().view(H_kv, -1, T, D)
        dots = torch.einsum("hgtd,hnd->htn", qg, keys[0, :, n_init:].float())  # (H_kv, T, n_l)
        dist = cache.new_pos[0][:, None] - pos[None]  # (T, n_l)
        score[:, n_init:] += (dots * ((dist >= 1) & (dist <= p.local))).sum(dim=1)
        self.scores[layer] = score
        if n - n_init > p.local:
            self.evict(layer, kv, n_init, math.ceil((n - n_init - p.local) / p.block))
        target = p.initial + p.local + p.chunk  # the most one step holds
        if kv.caps[0] > target and kv.length <= target:
            kv.shrink(target - kv.length)  # memory bounded whatever the prompt length

    def evict(self, layer: int, kv, n_init: int, blocks: int) -> None:
        """Move `blocks` whole blocks from the start of the local window to the store."""
        p, (keys, values), pos = self.params, kv.view(), kv.positions()[0, 0]  # (B, H_kv, n, D)
        B, H_kv, n, D = keys.shape
        score, r = self.scores[layer], p.representatives
        for b in range(blocks):
            s = slice(n_init + b * p.block, n_init + (b + 1) * p.block)
            top = score[:, s].topk(r, dim=-1).indices  # (H_kv, r) within the block
            picked = keys[0, :, s].gather(1, top[..., None].expand(-1, -1, D))  # (H_kv, r, D)
            at = pos[s][top].reshape(-1)  # (H_kv * r,)
            picked = rotate(picked.reshape(H_kv * r, D), -at, self.inv_freq)  # to position 0
            rep = picked.view(1, H_kv, r, D)  # (B, H_kv, r, D)
            if p.scoring == "mean":
                rep = rep.mean(dim=2, keepdim=True)  # a dot with the mean is the mean of dots
            self.stores[layer].add(keys[:, :, s], values[:, :, s], pos[s], rep)
        kept = torch.cat((torch.arange(n_init), torch.arange(n_init + blocks * p.block, n)))
        kv.keep(kept)
        self.scores[layer] = score[:, kept.to(score.device)]

    def info(self, cache) -> dict:
        return {**super().info(cache), "kv_store_blocks": sum(map(len, self.stores)),
                "kv_store_bytes": sum(s.nbytes() for s in self.stores),
                "kv_max_position": self.max_position}
