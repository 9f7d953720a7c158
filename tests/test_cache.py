"""KVCache invariants: every operation leaves the cache as if the kept tokens were all it saw."""

from __future__ import annotations

import pytest
import torch

from tokenlean.model.cache import KVCache
from tokenlean.model.config import ModelConfig
from tokenlean.model.transformer import Transformer

ATOL = 1e-5
VOCAB = 128
PREFIX = 12


@pytest.fixture(scope="module")
def model() -> Transformer:
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return Transformer(config).eval().requires_grad_(False)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def prefilled(model, prefix: torch.Tensor, capacity: int = 64) -> KVCache:
    cache = model.new_cache(capacity)
    model(prefix, cache=cache)
    return cache


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff < ATOL, f"{what}: max abs diff {diff:.2e}"


def valid(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, H_kv, n, D) keys and values of a cache whose layers are uniform."""
    views = [layer.view() for layer in cache.layers]
    return torch.stack([k for k, _ in views]), torch.stack([v for _, v in views])


# --- truncate -------------------------------------------------------------------------------


@torch.no_grad()
def test_truncate_then_reforward_is_as_if_never_gone_past(model):
    prefix, detour, path = tokens(PREFIX, 1), tokens(6, 2), tokens(5, 3)

    cache = prefilled(model, prefix)
    model(detour, cache=cache)
    cache.truncate(PREFIX)
    got = model(path, cache=cache)

    fresh = prefilled(model, prefix)
    want = model(path, cache=fresh)
    assert_close(got, want, "logits after truncate")
    assert cache.length == fresh.length == PREFIX + path.shape[1]
    for a, b in zip(valid(cache), valid(fresh)):
        assert_close(a, b, "cache entries after truncate")


def test_truncate_rejects_lengths_outside_the_cache(model):
    cache = prefilled(model, tokens(PREFIX, 1))
    for bad in (-1, PREFIX + 1):
        with pytest.raises(ValueError):
            cache.truncate(bad)


# --- keep: compacting to the accepted path of a tree ----------------------------------------

PARENTS = [-1, 0, 0, 1, 1, 2, 5]
ACCEPTED = [0, 2, 5, 6]  # a root-to-leaf path through the tree above


def tree_mask_and_positions(prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(PARENTS)
    mask = torch.zeros(n, prefix_len + n, dtype=torch.bool)
    mask[:, :prefix_len] = True
    depth = torch.zeros(n, dtype=torch.long)
    for node, parent in enumerate(PARENTS):
        if parent >= 0:
            mask[node] = mask[parent]
            depth[node] = depth[parent] + 1
        mask[node, prefix_len + node] = True
    return mask, prefix_len + depth


@torch.no_grad()
def test_keep_accepted_path_equals_forwarding_that_path_alone(model):
    prefix, tree, nxt = tokens(PREFIX, 4), tokens(len(PARENTS), 5), tokens(3, 6)
    assert all(PARENTS[b] == a for a, b in zip(ACCEPTED, ACCEPTED[1:]))

    cache = prefilled(model, prefix)
    mask, positions = tree_mask_and_positions(PREFIX)
    model(tree, positions=positions, cache=cache, mask=mask)
    cache.keep_new(len(PARENTS), torch.tensor(ACCEPTED))

    fresh = prefilled(model, prefix)
    model(tree[:, ACCEPTED], cache=fresh)
    assert cache.length == fresh.length == PREFIX + len(ACCEPTED)
    for a, b in zip(valid(cache), valid(fresh)):
        assert_close(a, b, "cache entries after keep")
    assert_close(model(nxt, cache=cache), model(nxt, cache=fresh), "next logits after keep")


@torch.no_grad()
def test_per_head_keep_moves_each_heads_own_slots(model):
    cache = prefilled(model, tokens(PREFIX, 7))
    k_before, v_before = (t.clone() for t in valid(cache))
    index = torch.tensor([[0, 3, 4, 9, 11], [1, 2, 5, 6, 10]])  # (H_kv, n)

    cache.keep(index)

    n = index.shape[1]
    k_after, v_after = valid(cache)
    assert cache.length == n and cache.seen == PREFIX
    for h, slots in enumerate(index):
        assert torch.equal(k_after[:, :, h], k_before[:, :, h, slots])
        assert torch.equal(v_after[:, :, h], v_before[:, :, h, slots])
        assert cache.layers[0].positions()[0, h].tolist() == slots.tolist()


@torch.no_grad()
def test_per_head_keep_with_one_shared_set_equals_shared_keep(model):
    shared = prefilled(model, tokens(PREFIX, 8))
    per_head = prefilled(model, tokens(PREFIX, 8))
    index = torch.tensor([0, 2, 3, 7, 8, 11])

    shared.keep(index)
    per_head.keep(index.expand(model.config.num_key_value_heads, -1))

    for a, b in zip(valid(shared), valid(per_head)):
        assert torch.equal(a, b)


# --- capacity and memory --------------------------------------------------------------------


@torch.no_grad()
def test_resize_frees_memory_and_keeps_valid_entries(model):
    prefix, nxt = tokens(PREFIX, 9), tokens(4, 10)
    cache = prefilled(model, prefix, capacity=256)
    reference = prefilled(model, prefix, capacity=256)
    k_before, v_before = (t.clone() for t in valid(cache))
    allocated = cache.nbytes(allocated=True)

    cache.resize(PREFIX + nxt.shape[1])

    assert cache.capacity == PREFIX + nxt.shape[1]
    assert cache.nbytes(allocated=True) < allocated
    storage = sum(t.untyped_storage().nbytes() for layer in cache.layers
                  for t in (layer.k, layer.v, layer.own_pos))
    assert storage == cache.nbytes(allocated=True)
    assert torch.equal(valid(cache)[0], k_before) and torch.equal(valid(cache)[1], v_before)
    assert_close(model(nxt, cache=cache), model(nxt, cache=reference), "logits after resize")


def test_resize_below_length_raises(model):
    cache = prefilled(model, tokens(PREFIX, 11))
    with pytest.raises(ValueError):
        cache.resize(PREFIX - 1)


@torch.no_grad()
def test_writing_past_capacity_raises(model):
    cache = model.new_cache(PREFIX)
    model(tokens(PREFIX, 12), cache=cache)  # exactly full is fine
    assert cache.length == cache.capacity
    with pytest.raises(RuntimeError, match="full"):
        model(tokens(1, 13), cache=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_nbytes_counts_keys_and_values_of_every_layer_head_and_row(dtype, batch):
    L, H, D, capacity, length = 3, 2, 8, 10, 4
    cache = KVCache(L, H, D, capacity, batch=batch, dtype=dtype)
    assert cache.nbytes(allocated=True) == 0  # layers allocate on their first write
    k = torch.ones(batch, H, length, D, dtype=dtype)
    cache.begin(torch.arange(length))
    for layer in range(L):
        cache.write(layer, k, k)
    cache.advance(length)
    per_slot = 2 * L * batch * H * D * torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes() == per_slot * length
    assert cache.nbytes(allocated=True) == per_slot * capacity
