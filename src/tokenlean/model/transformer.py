"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM).

Parameter names follow Hugging Face's so a checkpoint's state dict loads as is
and our saved weights load in transformers. Positions and the attention mask
are explicit, so a tree of draft tokens is scored in one forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenlean.model.attention import attend, causal_mask
from tokenlean.model.cache import KVCache
from tokenlean.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with linear or Llama-3 scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    inv_freq = inv_freq.float()
    if "rope_freqs" in config.extra:  # a GGUF's llama3 factors divide them, as in llama.cpp
        inv_freq = inv_freq / torch.tensor(config.extra["rope_freqs"], dtype=torch.float32)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, `x * cos + cat(-x2, x1) * sin`, as x * cos + roll(x) * signed_sin
    with signed_sin = cat(-sin1, sin2): the same numbers ((-a) * b == -(a * b) exactly), in
    4 tensor ops instead of 7 (per-op dispatch is most of a small model's decode step)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference implementations do.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.window = c.sliding_window
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        self.qkv: nn.Module | None = None  # q, k and v in one projection (model.packed)

    def project(self, x):
        """q and k side by side, (B, T, H + H_kv, D), and v, (B, T, H_kv, D): q and k are then
        normed and rotated in one pass each, fewer tensor ops per layer."""
        B, T, _ = x.shape
        if self.qkv is None:
            qk, v = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x)
        else:
            qkv = self.qkv(x)
            qk, v = qkv.split(((self.n_heads + self.n_kv) * self.head_dim,
                               self.n_kv * self.head_dim), dim=-1)
        return qk.view(B, T, -1, self.head_dim), v.view(B, T, -1, self.head_dim)

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, _ = x.shape
        H = self.n_heads
        qk, v = self.project(x)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        qk = apply_rope(qk.transpose(1, 2), cos, sin)  # (B, H + H_kv, T, D)
        q, k = qk[:, :H], qk[:, H:]  # (B, H, T, D), (B, H_kv, T, D)
        v = v.transpose(1, 2)
        if cache is not None:  # attention in the cache's dtype (Transformer.kv_dtype)
            q, k, v = q.to(cache.dtype), k.to(cache.dtype), v.to(cache.dtype)
        if isinstance(cache, Segments):  # a packed batch: each sequence over its own cache
            out = cache.attend(q, k, v, self.layer, self.window)
        else:
            out = attend(q, k, v, cache, self.layer, mask, self.window)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


@dataclass
class Segment:
    """One sequence's share of a packed forward (`Transformer.forward_packed`): its new
    tokens and their positions (T,), its own cache, a mask over the new tokens (T, T)
    (None: causal; a draft tree passes its ancestor mask) and how many of its last
    positions need logits (None: all of them, as a tree's verification does)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    mask: torch.Tensor | None = None
    logits_for: int | None = 1


class Segments:
    """What the layers see of a packed forward in place of one cache: the projections and
    the MLP run once over every sequence's tokens; attention runs per sequence, each over
    its own cache (which may hold any length, policy or tree)."""

    def __init__(self, segments: list[Segment]):
        self.items = segments
        self.bounds, start = [], 0
        for s in segments:
            T = len(s.tokens)
            self.bounds.append((start, start + T))
            start += T
        self.masks = [s.mask if s.mask is not None or len(s.tokens) == 1
                      else causal_mask(len(s.tokens), s.tokens.device) for s in segments]
        self.dtype = segments[0].cache.dtype

    def attend(self, q, k, v, layer: int, window: int | None) -> torch.Tensor:
        outs = [attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s.cache, layer, mask, window)
                for s, (a, b), mask in zip(self.items, self.bounds, self.masks)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.gate_up: nn.Module | None = None  # gate and up in one projection (model.packed)

    def forward(self, x):
        if self.gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Transformer(nn.Module):
    """`forward(tokens, positions, cache, mask) -> logits`.

    - tokens, positions: (B, T) (positions may be (T,) for all rows).
    - positions default to the cache's `next_position` onwards.
    - cache: the new keys/values join every layer; `cache.seen` grows by T. None:
      a plain causal forward (training).
    - mask: bool, True = attend, over the new tokens (T, T) or (B, T, T) -- every
      cached slot is then visible -- or, for a cache every head of which holds the
      same slots, over cached + new (T, S) / (B, T, S). None: causal. A sliding
      window is applied from the positions the cache stores.
    - last_n: only compute logits for the last n positions (prefill needs one).
    - stop_after: run layers 0..stop_after only and return None (GemFilter reads
      that layer's attention through the cache policy).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.packed_head: nn.Module | None = None  # set by model.packed.pack_for_cpu

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the model's, except fp32 for bf16/fp16 on CPU, where torch's
        attention kernel is ~4x slower in bf16 than in fp32 at one query over a few hundred
        keys (an ad-hoc measurement on the project's 2-core VM): attention then runs in fp32,
        at twice the cache memory."""
        if self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return self.dtype

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        cache = KVCache.for_model(self.config, capacity, batch, self.kv_dtype, self.device)
        cache.inv_freq = self.inv_freq
        return cache

    def window_mask(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        """(Q, K) True where key position lies within the sliding window of the query
        position; None for a model without a window."""
        window = self.config.sliding_window
        return keys[None, :] > queries[:, None] - window if window else None

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        last_n: int | None = None,
        stop_after: int | None = None,
    ) -> torch.Tensor | None:
        B, T = tokens.shape
        start = cache.next_position if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        if mask is None and T > 1 and (cache is not None or self.config.sliding_window):
            mask = causal_mask(T, tokens.device)
            if cache is None:
                mask = mask & self.window_mask(positions, positions)
        if mask is not None and mask.dim() == 3 and cache is None:
            mask = mask[:, None]  # (B, 1, T, S) broadcasts over heads
        if cache is not None:
            cache.begin(positions)
        cos, sin = self.rope(positions)
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, mask)
            if i == stop_after:
                return None
        if cache is not None:
            cache.advance(T)
        if last_n is not None:
            x = x[:, -last_n:]
        return self.lm_logits(x)

    def forward_packed(self, segments: list[Segment]) -> list[torch.Tensor]:
        """One forward over several sequences, each with its own cache: their new tokens are
        packed into one row, so every weight is read once for all of them (what batching
        buys on a memory-bound decode step). Returns each segment's logits (n, V)."""
        tokens = torch.cat([s.tokens for s in segments])[None]  # (1, N)
        positions = torch.cat([s.positions for s in segments])  # (N,)
        for s in segments:
            s.cache.begin(s.positions)
        cos, sin = self.rope(positions)
        x = self.model.embed_tokens(tokens)
        batch = Segments(segments)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, None)
        rows, counts = [], []
        for s, (start, end) in zip(segments, batch.bounds):
            s.cache.advance(end - start)
            n = end - start if s.logits_for is None else min(s.logits_for, end - start)
            rows.extend(range(end - n, end))
            counts.append(n)
        logits = self.lm_logits(x[:, rows])[0]  # (sum n, V)
        return list(logits.split(counts))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (B?, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), signed_sin(emb.sin().to(self.dtype))
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x)
        if self.packed_head is not None:
            return self.packed_head(x)
        return F.linear(x, self.head_weight())
