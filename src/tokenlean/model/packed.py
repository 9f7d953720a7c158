"""CPU inference with the projection weights prepacked by oneDNN.

On tl-code's projections (2 threads, fp32, an ad-hoc microbenchmark on the
project's 2-core machine) F.linear took 3.9 ms for 1 token and 6.9 ms for 16;
oneDNN with prepacked weights 1.6 ms and 2.4 ms -- the cost of a decoding step
and of verifying a 16-token draft tree. Fusing q/k/v and gate/up into one call
each took another ~0.35 ms off a step. oneDNN also computed each output row
identically whatever the number of rows in our checks, which keeps tree
verification close to one-token-at-a-time decoding (exactness itself is tested
end to end in tests/test_spec.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenlean.model.transformer import Transformer


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PackedLinear(nn.Module):
    """`y = x W^T + b` with W held only in oneDNN's packed layout.

    `weight` stays as a shape-only (meta) parameter so parameter counts hold; the
    real values live in `packed`, so no memory is spent on a second copy.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.packed = _pack(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.weight = nn.Parameter(torch.empty(weight.shape, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def fused(linears: list[nn.Linear]) -> PackedLinear:
    """One projection whose output is the given ones' outputs side by side."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears])
    return PackedLinear(weight, bias)


def can_pack(model: Transformer) -> bool:
    return (model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def pack_for_cpu(model: Transformer) -> bool:
    """Swap every projection (and the output head) for a PackedLinear, q/k/v and gate/up
    fused into one each; False (model unchanged) where unsupported."""
    if not can_pack(model):
        return False
    try:
        _pack(torch.zeros(2, 2, dtype=model.dtype))
    except (RuntimeError, AttributeError):  # a torch build without these oneDNN ops: F.linear
        return False
    for layer in model.model.layers:  # fewer, larger calls: ~10 % of a decoding step
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = fused([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.q_proj = attn.k_proj = attn.v_proj = None
        mlp.gate_up = fused([mlp.gate_proj, mlp.up_proj])
        mlp.gate_proj = mlp.up_proj = None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight, child.bias))
    if model.config.tie_word_embeddings:  # the embedding still needs its dense table
        model.packed_head = PackedLinear(model.model.embed_tokens.weight, None)
        model.packed_head.weight = None  # shared with the embedding: not a second parameter
    else:
        model.packed_head = model.lm_head
    return True
