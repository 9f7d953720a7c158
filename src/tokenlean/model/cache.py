"""The KV cache: per layer, per KV head, a run of slots; each slot remembers its position.

A slot is not a position. The cache counts the tokens it has seen (`seen`) apart
from the slots it still holds, and every layer stores the position each slot was
written at, so entries can be evicted (a cache policy) or compacted (the accepted
path of a draft tree) without the next token's position going wrong.

Storage is ragged: a layer holds, for each KV head h, `caps[h]` slots of which the
first `lens[h]` are filled, in one flat (B, sum(caps), D) tensor. While every head
of a layer has the same capacity and length (no policy, or one that keeps equal
counts) the layer is *uniform* and is read as one (B, H_kv, T, D) view: the plain
decode path is one write and one slice per layer, as in gpt-fast's cache. A policy
that keeps different numbers of entries per head (AdaKV, DuoAttention) makes the
layer ragged; `shrink` then reallocates it to what it holds, so memory really comes
back, and `nbytes` counts what is allocated.

Keys are stored after RoPE, rotated at the position they were written at; a policy
that re-indexes positions (StreamingLLM) re-rotates what it keeps (`rotate`).
Layers allocate on first write, so a policy that compresses each layer right after
its prefill attention holds one full layer at a time, not all of them.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys (..., T, D) rotated by `delta` (T,) positions more (RoPE composes additively)."""
    freqs = delta.to(torch.float32)[:, None] * inv_freq  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


class LayerKV:
    """One layer's keys, values and slot positions, ragged over KV heads."""

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device, shared_pos):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.dtype, self.device = dtype, device
        self.caps = [capacity] * heads
        self.lens = [0] * heads
        self.k: torch.Tensor | None = None  # (B, sum(caps), D), allocated on first write
        self.v: torch.Tensor | None = None
        self.own_pos: torch.Tensor | None = None  # (B, sum(caps)) once compacted
        self._shared_pos = shared_pos  # the cache's slot-aligned positions while uniform

    # --- layout ---------------------------------------------------------------------------

    @property
    def uniform(self) -> bool:
        return len(set(self.caps)) == 1 and len(set(self.lens)) == 1

    @property
    def length(self) -> int:
        """Entries per head (uniform layers), else the most any head holds."""
        return max(self.lens)

    def offsets(self) -> list[int]:
        out, start = [], 0
        for cap in self.caps:
            out.append(start)
            start += cap
        return out

    def _allocate(self) -> None:
        total = sum(self.caps)
        self.k = torch.zeros(self.batch, total, self.head_dim, dtype=self.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)

    def pos(self) -> torch.Tensor:
        """(B, sum(caps)) the position of every slot (filled or not)."""
        if self.own_pos is not None:
            return self.own_pos
        shared = self._shared_pos()  # (B, cap): the same for every head
        return shared[:, : self.caps[0]].repeat(1, self.heads)

    def _own_positions(self) -> torch.Tensor:
        if self.own_pos is None:
            self.own_pos = self.pos().clone()
        return self.own_pos

    # --- reading ----------------------------------------------------------------------------

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform layers: keys, values (B, H_kv, n, D) of the filled slots."""
        B, H, D = self.batch, self.heads, self.head_dim
        n = self.lens[0]
        k = self.k.view(B, H, self.caps[0], D)[:, :, :n]
        v = self.v.view(B, H, self.caps[0], D)[:, :, :n]
        return k, v

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (B, n_h, D) and positions (B, n_h) of head h's filled slots."""
        start = self.offsets()[h]
        end = start + self.lens[h]
        return self.k[:, start:end], self.v[:, start:end], self.pos()[:, start:end]

    def positions(self) -> torch.Tensor:
        """Uniform layers: (B, H_kv, n) positions of the filled slots."""
        if self.own_pos is None:
            return self._shared_pos()[:, None, : self.lens[0]].expand(-1, self.heads, -1)
        return self.own_pos.view(self.batch, self.heads, -1)[:, :, : self.lens[0]]

    # --- writing ----------------------------------------------------------------------------

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append T new (B, H_kv, T, D) keys/values to every head. positions: (B, T)."""
        if self.k is None:
            self._allocate()
        T = k.shape[2]
        if any(n + T > cap for n, cap in zip(self.lens, self.caps)):
            raise RuntimeError(f"KV cache full: {max(self.lens) + T} slots needed, "
                               f"capacity {min(self.caps)}")
        if self.uniform:
            n, cap = self.lens[0], self.caps[0]
            B, H, D = self.batch, self.heads, self.head_dim
            self.k.view(B, H, cap, D)[:, :, n : n + T] = k
            self.v.view(B, H, cap, D)[:, :, n : n + T] = v
            if self.own_pos is not None:
                self.own_pos.view(B, H, cap)[:, :, n : n + T] = positions[:, None]
        else:
            pos = self._own_positions()
            for h, start in enumerate(self.offsets()):
                at = start + self.lens[h]
                self.k[:, at : at + T] = k[:, h]
                self.v[:, at : at + T] = v[:, h]
                pos[:, at : at + T] = positions
        self.lens = [n + T for n in self.lens]

    # --- compaction -------------------------------------------------------------------------

    def keep(self, index: list[torch.Tensor] | torch.Tensor) -> None:
        """Keep, in head h, the filled slots `index[h]` (ascending, relative to the head),
        moved to the front. One tensor (n,) keeps the same slots in every head; (H_kv, n)
        or a list keeps a set per head (a list may differ in size per head)."""
        if isinstance(index, torch.Tensor) and index.dim() == 1:
            index = [index] * self.heads
        index = [torch.as_tensor(i, dtype=torch.long, device=self.device) for i in index]
        pos = self._own_positions()
        for h, start in enumerate(self.offsets()):
            idx = index[h]
            if len(idx) and int(idx.max()) >= self.caps[h]:
                raise IndexError(f"slot {int(idx.max())} outside head {h}'s {self.caps[h]} slots")
            n = len(idx)
            src = start + idx
            self.k[:, start : start + n] = self.k[:, src]
            self.v[:, start : start + n] = self.v[:, src]
            pos[:, start : start + n] = pos[:, src]
            self.lens[h] = n

    def keep_new(self, written: int, kept: torch.Tensor) -> None:
        """Of the `written` entries the last forward appended to every head, keep those at
        offsets `kept` (ascending): the root and accepted path of a draft tree."""
        if self.uniform and self.own_pos is None:  # the plain/spec fast path: one gather
            B, H, D, cap = self.batch, self.heads, self.head_dim, self.caps[0]
            base = self.lens[0] - written
            src = base + kept.to(self.device)
            for t in (self.k, self.v):
                t.view(B, H, cap, D)[:, :, base : base + len(kept)] = t.view(B, H, cap, D)[:, :, src]
            self.lens = [base + len(kept)] * H
            return
        index = []
        for n in self.lens:
            index.append(torch.cat([torch.arange(n - written), n - written + kept.cpu()]))
        self.keep(index)

    def truncate(self, drop: int) -> None:
        """Forget the last `drop` entries of every head."""
        if any(n < drop for n in self.lens):
            raise ValueError(f"cannot drop {drop} entries from a layer holding {min(self.lens)}")
        self.lens = [n - drop for n in self.lens]

    def shrink(self, room: int | list[int]) -> None:
        """Reallocate each head to its entries + `room` free slots (one for every head, or
        one per head): the way memory comes back."""
        if self.k is None:
            return
        rooms = [room] * self.heads if isinstance(room, int) else list(room)
        caps = [n + r for n, r in zip(self.lens, rooms)]
        if caps == self.caps:
            return
        total = sum(caps)
        k = self.k.new_zeros(self.batch, total, self.head_dim)
        v = torch.zeros_like(k)
        old_pos = self.pos()
        pos = old_pos.new_zeros(self.batch, total)
        new_start = 0
        for h, old_start in enumerate(self.offsets()):
            n = self.lens[h]
            k[:, new_start : new_start + n] = self.k[:, old_start : old_start + n]
            v[:, new_start : new_start + n] = self.v[:, old_start : old_start + n]
            pos[:, new_start : new_start + n] = old_pos[:, old_start : old_start + n]
            new_start += caps[h]
        self.k, self.v, self.own_pos, self.caps = k, v, pos, caps

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of keys + values (+ their positions once the layer keeps its own)."""
        if self.k is None:
            return 0
        per_slot = 2 * self.batch * self.head_dim * self.k.element_size()
        if self.own_pos is not None:
            per_slot += self.batch * self.own_pos.element_size()
        return per_slot * (sum(self.caps) if allocated else sum(self.lens))


class KVCache:
    """Per-layer ragged storage plus the sequence's counters.

    - seen: tokens fed so far (prompt + accepted), what a position counts.
    - shift: how far a re-indexing policy moved positions back (StreamingLLM);
      the next token goes to position `next_position = seen - shift`.
    - policy: a CachePolicy (tokenlean.kv) that the attention consults, or None.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.batch, self.dtype, self.device = batch, dtype, torch.device(device)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.capacity = capacity
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # (B, cap)
        self.layers = [LayerKV(batch, n_kv_heads, head_dim, capacity, dtype, device,
                               lambda: self.pos) for _ in range(n_layers)]
        self.seen = 0
        self.shift = 0
        self.slots = 0  # filled slots of `pos`, which layers not yet compacted share
        self.new_pos = self.pos[:, :0]  # (B, T) positions of the forward being run
        self.policy = None
        self.inv_freq: torch.Tensor | None = None  # RoPE frequencies, for re-rotating keys

    @classmethod
    def for_model(cls, config, capacity: int, batch: int = 1, dtype=None, device=None) -> KVCache:
        return cls(
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            capacity,
            batch=batch,
            dtype=dtype or torch.float32,
            device=device or "cpu",
        )

    @property
    def next_position(self) -> int:
        return self.seen - self.shift

    @property
    def length(self) -> int:
        """Entries held per head, where every layer and head holds the same number (no
        policy, or a policy that keeps equal counts); otherwise the most any head holds."""
        return max(layer.length for layer in self.layers)

    def begin(self, positions: torch.Tensor) -> None:
        """Record the positions (B, T) or (T,) of the T tokens a forward is about to write."""
        positions = positions.expand(self.batch, -1) if positions.dim() == 1 else positions
        T = positions.shape[-1]
        self.new_pos = positions
        if any(layer.own_pos is None for layer in self.layers):
            if self.slots + T > self.capacity:
                raise RuntimeError(f"KV cache full: {self.slots + T} slots needed, "
                                   f"capacity {self.capacity}")
            self.pos[:, self.slots : self.slots + T] = positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store (B, H_kv, T, D) new keys/values in a uniform layer; return all of its keys
        and values (B, H_kv, n + T, D). (Ragged layers are read per head, `model.attention`.)"""
        kv = self.layers[layer]
        kv.write(k, v, self.new_pos)
        return kv.view()

    def advance(self, n: int) -> None:
        """Count the n tokens the last forward fed (every layer has appended them)."""
        self.seen += n
        self.slots += n

    def truncate(self, seen: int) -> None:
        """Forget the tokens fed after the first `seen` (drop their entries everywhere)."""
        if not 0 <= seen <= self.seen:
            raise ValueError(f"cannot truncate a cache that has seen {self.seen} tokens to {seen}")
        drop = self.seen - seen
        for layer in self.layers:
            layer.truncate(drop)
        self.seen = seen
        self.slots -= drop

    def keep_new(self, written: int, kept: torch.Tensor) -> None:
        """Of the `written` tokens the last forward fed, keep those at offsets `kept`: a draft
        tree's root and accepted path. `seen` then counts only the kept ones."""
        kept = kept.to(torch.long)
        base = self.slots - written  # slot-aligned positions compact with the slots
        self.pos[:, base : base + len(kept)] = self.pos[:, base + kept.to(self.pos.device)]
        for layer in self.layers:
            layer.keep_new(written, kept)
        self.seen += len(kept) - written
        self.slots += len(kept) - written

    def keep(self, index: torch.Tensor) -> None:
        """Keep, in every layer, the slots `index` (ascending): (n,) for one set, or (H_kv, n)
        for a set per KV head. What a policy evicts; `seen` does not change."""
        for layer in self.layers:
            layer.keep(torch.as_tensor(index, dtype=torch.long))

    def resize(self, capacity: int) -> None:
        """Reallocate every layer to `capacity` slots per head: the way memory is freed."""
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} below the cache length {self.length}")
        for layer in self.layers:
            layer.shrink(capacity - layer.length)
        self.capacity = capacity

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of the filled entries (or of everything allocated), all layers."""
        return sum(layer.nbytes(allocated) for layer in self.layers)
