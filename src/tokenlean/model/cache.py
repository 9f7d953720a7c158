"""A preallocated KV cache, indexed by slot (gpt-fast style).

Keys are stored after RoPE, so a slot keeps the position it was written with.
Every change is an explicit operation: `advance` after a forward wrote new
slots, `truncate` to drop a suffix, `keep` to compact to an index set (the
accepted path of a draft tree, or what a cache policy retains), `resize` to
really give memory back.
"""

from __future__ import annotations

import torch


class KVCache:
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
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H_kv, T, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

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
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store (B, H_kv, T, D) new keys/values after the current length; return all valid ones."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} slots needed, capacity {self.capacity}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Make the n slots written by the last forward part of the cache."""
        self.length += n

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def keep(self, index: torch.Tensor, start: int = 0) -> None:
        """Compact the cache to slots [0, start) + the slots in `index`, without reallocating.

        `index` (absolute slot numbers >= start, ascending) is (n,) for one set shared by all
        heads, or (H_kv, n) for a set per KV head (equal sizes). Slots past the current length
        that the last forward wrote may be kept (the accepted path of a draft tree).
        """
        index = index.to(self.k.device, torch.long)
        n = index.shape[-1]
        end = start + n
        if index.dim() == 1:
            self.k[:, :, :, start:end] = self.k[:, :, :, index]
            self.v[:, :, :, start:end] = self.v[:, :, :, index]
        else:  # per-head sets: gather along the slot axis
            L, B, H, _, D = self.k.shape
            gather = index.view(1, 1, H, n, 1).expand(L, B, H, n, D)
            self.k[:, :, :, start:end] = self.k.gather(3, gather)
            self.v[:, :, :, start:end] = self.v.gather(3, gather)
        self.length = end

    def resize(self, capacity: int) -> None:
        """Reallocate to `capacity` slots (keeping the valid ones): the way memory is freed."""
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} below the cache length {self.length}")
        shape = (*self.k.shape[:3], capacity, self.k.shape[4])
        k = self.k.new_zeros(shape)
        v = self.v.new_zeros(shape)
        k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of the valid entries (or of the whole allocation)."""
        per_slot = 2 * self.k[:, :, :, :1].numel() * self.k.element_size()
        return per_slot * (self.capacity if allocated else self.length)
