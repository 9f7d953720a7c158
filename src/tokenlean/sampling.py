"""Temperature / top-k / top-p -> next-token probabilities.

Plain and speculative decoding both call `probabilities`, so the target
distribution p is shaped identically on both paths (a lossless requirement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> no limit
    top_p: float = 1.0
    seed: int | None = None
    # OpenAI's penalties over the tokens generated so far: logit -= frequency * count
    # + presence * (count > 0). Not a speculative rule: a penalized sequence is not drafted.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature <= 100):
            raise UserError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise UserError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def penalize(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) logits less the presence and frequency penalties of (V,) generated-token counts."""
    return (logits.float() - params.frequency_penalty * counts
            - params.presence_penalty * (counts > 0).float())


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k, top-p."""
    logits = logits.float()
    if params.greedy:  # the one-hot distribution of the argmax
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # shift before dividing, so a tiny temperature tends to the argmax instead of inf / nan
    # (below 1e-30, which float32 still holds, the distribution is the argmax's anyway)
    logits = (logits - logits.amax(-1, keepdim=True)) / max(params.temperature, 1e-30)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row of (..., V) probabilities."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def gumbel(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel noise, float64."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))


def without_replacement(q: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """The distribution each of tokens[j] was drawn from: q without tokens[:j], renormalised."""
    rows, rest = [], q.clone()
    for t in tokens:
        rows.append(rest / rest.sum())
        rest = rest.clone()
        rest[t] = 0.0
    return rows


def draw_without_replacement(q: torch.Tensor, k: int,
                             generator: torch.Generator) -> tuple[list[int], list[torch.Tensor]]:
    """Up to k distinct tokens drawn from q (float64 probabilities) without replacement, in
    draw order (the Gumbel-top-k trick), and the distribution each was drawn from."""
    keys = q.log() + gumbel(q.shape, generator, q.device)
    tokens = keys.topk(min(k, int((q > 0).sum()))).indices.tolist()
    return tokens, without_replacement(q, tokens)
