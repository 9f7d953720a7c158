"""Which KV heads need the whole context: the calibration behind kv policy `duo`.

DuoAttention (arXiv 2410.10819) optimises one gate value per KV head on synthetic
passkey data, mixing full and streaming attention. This is a cheap proxy for those
gates, one forward per sample and no training: on synthetic long-range-copy sequences
(random tokens, with spans repeated far later, so copying them needs the distant
context), each KV head's attention output is computed twice from the same q, k, v --
over the full causal context, and restricted to the `sinks` first keys plus the
`recent` last ones -- and the head's score is the mean squared relative deviation
||o_full - o_stream||^2 / ||o_full||^2 over its query group and the queries past the
window. A high score means the head reads distant context: a retrieval head.

Saved as JSON, `{"model", "digest", "sinks", "recent", "length", "samples", "scores":
[[per KV head] per layer]}`, by default in `<TOKENLEAN_HOME>/kv-calibration/
<model>.duo.json` (the zoo folder is inside the package); re-run when the weights'
digest or the window differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from tokenlean.zoo import tokenlean_home

METHOD = "mean squared relative deviation, full vs sink+recent attention, per KV head"


def model_digest(model) -> str:
    """12 hex digits from the config and the first weights: the same model, the same file."""
    h = hashlib.sha256(repr(sorted((k, str(v)) for k, v in vars(model.config).items())).encode())
    first = model.model.embed_tokens.weight[:8].detach().float().cpu().contiguous()
    h.update(first.numpy().tobytes())
    return h.hexdigest()[:12]


def model_name(model) -> str:
    """The model's name if it has one (an LM sets it), else its family and digest."""
    return getattr(model, "name", None) or f"{model.config.model_type}-{model_digest(model)}"


def default_path(model) -> Path:
    return tokenlean_home() / "kv-calibration" / f"{model_name(model)}.duo.json"


def calibration_tokens(vocab: int, length: int, seed: int) -> torch.Tensor:
    """(1, length) random tokens; spans of the first half repeated in the second half,
    each copy more than half the sequence after its source."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (length,), generator=g)
    span, half = max(4, length // 32), length // 2
    for start in range(half, length - span + 1, 2 * span):
        src = int(torch.randint(0, max(1, start - half), (1,), generator=g))
        seq[start : start + span] = seq[src : src + span].clone()
    return seq[None]


class _Probe:
    """A stand-in cache policy: reads each layer's q, k, v and scores its heads."""

    def __init__(self, sinks: int, recent: int):
        self.sinks, self.recent = sinks, recent
        self.scores: dict[int, torch.Tensor] = {}

    def attend(self, q, k, v, cache, layer, mask):
        return None

    def after_attention(self, layer, q, kv, cache) -> None:
        keys, values = kv.view()  # (1, H_kv, n, D), slot = position (a fresh cache)
        B, H, T, D = q.shape
        H_kv, n = keys.shape[1], keys.shape[2]
        i = torch.arange(n - T, n)[:, None]  # query positions
        j = torch.arange(n)[None]
        causal = j <= i
        streaming = causal & ((j < self.sinks) | (i - j < self.recent))
        qg = q[0].float().view(H_kv, H // H_kv, T, D)
        logits = torch.einsum("hgtd,hnd->hgtn", qg, keys[0].float()) / math.sqrt(D)
        vals = values[0].float()[:, None]  # (H_kv, 1, n, D)
        full = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ vals
        stream = logits.masked_fill(~streaming, float("-inf")).softmax(-1) @ vals
        dev = (full - stream).square().sum(-1) / full.square().sum(-1).clamp_min(1e-12)
        past = (i[:, 0] >= self.sinks + self.recent).nonzero()[:, 0]  # queries it restricts
        self.scores[layer] = dev[:, :, past].mean(dim=(1, 2))  # (H_kv,)


def head_scores(model, sinks: int, recent: int, length: int | None = None,
                samples: int = 2) -> list[list[float]]:
    """[[score per KV head] per layer], averaged over `samples` calibration sequences."""
    c = model.config
    if length is None:
        length = min(c.max_position_embeddings, max(1024, 4 * (sinks + recent)))
    if length <= sinks + recent:
        raise ValueError(f"calibration length {length} must exceed sinks + recent")
    total = torch.zeros(c.num_hidden_layers, c.num_key_value_heads)
    with torch.inference_mode():
        for seed in range(samples):
            probe = _Probe(sinks, recent)
            cache = model.new_cache(length)
            cache.policy = probe
            model(calibration_tokens(c.vocab_size, length, seed).to(model.device), cache=cache,
                  last_n=1)
            total += torch.stack([probe.scores[i].cpu() for i in range(c.num_hidden_layers)])
    return (total / samples).tolist()


def load_or_calibrate(model, path: str | Path | None, sinks: int, recent: int) -> dict:
    """The calibration at `path` (default: beside the model, `default_path`), made and
    saved first if missing or made for other weights or another window."""
    path = Path(path) if path else default_path(model)
    digest = model_digest(model)
    if path.is_file():
        data = json.loads(path.read_text())
        if (data.get("digest"), data.get("sinks"), data.get("recent")) == (digest, sinks, recent):
            return data
    print(f"tokenlean: calibrating duo attention heads of {model_name(model)} "
          f"(once) -> {path}", file=sys.stderr)
    length = min(model.config.max_position_embeddings, max(1024, 4 * (sinks + recent)))
    data = {"model": model_name(model), "digest": digest, "sinks": sinks, "recent": recent,
            "length": length, "samples": 2, "method": METHOD,
            "scores": head_scores(model, sinks, recent, length, samples=2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def retrieval_heads(scores: list[list[float]], share: float) -> torch.Tensor:
    """(L, H_kv) bool: the top `share` of all heads by score are retrieval heads."""
    s = torch.tensor(scores)
    n = min(s.numel(), max(0, round(share * s.numel())))
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[s.flatten().topk(n).indices] = True
    return mask.view(s.shape)
