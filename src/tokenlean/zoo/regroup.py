"""Give a trained model more KV heads (GQA groups) without training it again from scratch.

Why: tl-code run 5's retrieval misses (20-27 of 100 at 512-2048 tokens) were not misses
of place. Its last layer's three copy heads put ~95 % of their attention on the very token
to copy, on misses as on hits, and still emitted a look-alike ("65" -> "14"): the three
are query heads of one KV group, so all three read the same 64-dim value of that token.
More groups give a copy more value dimensions.

Query heads are regrouped so that each new group keeps an old group's keys and values
where it can (heads of one old group stay together); a group that has to mix heads of two
old groups takes the keys and values of its first head's group, so the other heads in it
are the only ones whose computation changes. Everything else stays as it was, and the
same mapping applies to the optimiser's moments, so training carries on where it was.
"""

from __future__ import annotations

import torch


def head_layout(n_heads: int, old_kv: int, new_kv: int) -> tuple[list[int], list[int]]:
    """(order, source): the old query head at each new head position, and the old KV head
    each new group starts from."""
    if new_kv < old_kv or n_heads % new_kv or n_heads % old_kv:
        raise ValueError(f"cannot regroup {n_heads} query heads from {old_kv} to {new_kv} KV "
                         "heads: the new count must be at least the old and divide the heads")
    per_old, per_new = n_heads // old_kv, n_heads // new_kv
    order: list[int] = []
    source: list[int] = []
    leftover: list[int] = []
    for group in range(old_kv):
        heads = list(range(group * per_old, (group + 1) * per_old))
        while len(heads) >= per_new:
            order += heads[:per_new]
            source.append(group)
            heads = heads[per_new:]
        leftover += heads
    for i in range(0, len(leftover), per_new):
        order += leftover[i : i + per_new]
        source.append(leftover[i] // per_old)
    return order, source


def changed_heads(n_heads: int, old_kv: int, new_kv: int) -> list[int]:
    """Old query heads that end up reading another group's keys and values."""
    order, source = head_layout(n_heads, old_kv, new_kv)
    per_old, per_new = n_heads // old_kv, n_heads // new_kv
    return [head for pos, head in enumerate(order) if head // per_old != source[pos // per_new]]


def regroup_tensor(name: str, tensor: torch.Tensor, head_dim: int, order: list[int],
                   source: list[int]) -> torch.Tensor:
    """One parameter (or an optimiser moment of it) in the new layout; others unchanged."""
    if ".self_attn.q_proj." in name:  # rows: heads x head_dim
        return tensor.reshape(-1, head_dim, *tensor.shape[1:])[order].flatten(0, 1)
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return tensor.reshape(-1, head_dim, *tensor.shape[1:])[source].flatten(0, 1)
    if name.endswith(".self_attn.o_proj.weight"):  # columns: heads x head_dim
        return tensor.reshape(tensor.shape[0], -1, head_dim)[:, order].flatten(1, 2)
    return tensor


def regroup(model_state: dict[str, torch.Tensor], opt_state: dict | None, param_names: list[str],
            n_heads: int, head_dim: int, old_kv: int, new_kv: int) -> tuple[dict, dict | None]:
    """A model state dict (and AdamW state, whose entries follow `param_names`' order) with
    `new_kv` KV heads instead of `old_kv`."""
    order, source = head_layout(n_heads, old_kv, new_kv)
    model_state = {name: regroup_tensor(name, t, head_dim, order, source)
                   for name, t in model_state.items()}
    if opt_state is not None:
        moments = {}
        for index, entry in opt_state["state"].items():
            name = param_names[index]
            moments[index] = {key: regroup_tensor(name, value, head_dim, order, source)
                              if torch.is_tensor(value) and value.dim() else value
                              for key, value in entry.items()}
        opt_state = {**opt_state, "state": moments}
    return model_state, opt_state
