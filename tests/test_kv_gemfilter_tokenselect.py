"""GemFilter and TokenSelect: each rule recomputed by hand from queries and keys caught in
the forward, the cache's counters and memory after GemFilter's re-run, TokenSelect's
output against masked dense attention, its selection reuse, and how each composes with
drafting."""

from __future__ import annotations

import math

import pytest
import torch

from tokenlean.errors import UserError
from tokenlean.kv.policies.gemfilter import GemFilter
from tokenlean.kv.policies.tokenselect import TokenSelect
from tokenlean.kv.policy import Budget
from tokenlean.kv.registry import KVConfig

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n" * 3


def prompt_ids(lm) -> list[int]:
    return lm.encode(PROMPT)


class Catch:
    """A stand-in cache policy that only records one layer's queries and keys."""

    def __init__(self, layer):
        self.layer, self.q, self.keys = layer, None, None

    def attend(self, q, k, v, cache, layer, mask):
        return None

    def after_attention(self, layer, q, kv, cache):
        if layer == self.layer:
            self.q, self.keys = q.clone(), kv.view()[0].clone()


# --- GemFilter ------------------------------------------------------------------------------


def gemfilter_by_hand(q, keys, k, kernel, softmax):
    """The last query against every key of its KV head, / sqrt(D), (softmax,) summed over
    all heads, a mean over a centred `kernel` window, the last token forced in, top k."""
    _, H, T, D = q.shape
    group = H // keys.shape[1]
    scores = torch.zeros(T)
    for h in range(H):
        logits = (q[0, h, -1] @ keys[0, h // group].T) / math.sqrt(D)
        scores += logits.softmax(-1) if softmax else logits
    pooled = torch.stack([scores[max(0, i - kernel // 2) : i + kernel // 2 + 1].mean()
                          for i in range(T)])
    pooled[-1] = float("inf")
    return sorted(pooled.topk(k).indices.tolist())


@pytest.mark.parametrize("layer, softmax", [(0.0, False), (1.0, False), (0.0, True)])
@torch.no_grad()
def test_gemfilter_selects_the_top_tokens_by_the_filter_layers_last_query(tiny_lm, layer, softmax):
    model, ids = tiny_lm.model, prompt_ids(tiny_lm)
    T, budget = len(ids), Budget(0.3)
    catch = Catch(int(layer))
    full = model.new_cache(T)
    full.policy = catch
    model(torch.tensor([ids]), cache=full)  # the whole model: layer r's q/k are the same

    policy = GemFilter(budget, GemFilter.Params(layer=layer, kernel=5, softmax=softmax))
    policy.prefill(model, model.new_cache(T + 8), torch.tensor([ids]), room=8)
    want = gemfilter_by_hand(catch.q, catch.keys, budget.tokens(T), 5, softmax)
    assert policy.r == int(layer)
    assert policy.selected.tolist() == want
    assert want[-1] == T - 1


@torch.no_grad()
def test_gemfilter_reruns_the_model_on_the_selection_at_fresh_positions(tiny_lm):
    """After prefill: seen = T, shift = T - k, next position k; every layer holds exactly
    the k selected tokens at positions 0..k-1 (room for decoding allocated, no more), and
    the logits and keys are those of a plain forward on the selected ids."""
    model, ids = tiny_lm.model, prompt_ids(tiny_lm)
    T, room = len(ids), 6
    policy = GemFilter(Budget(0.4))
    cache = model.new_cache(T + room)
    logits = policy.prefill(model, cache, torch.tensor([ids]), room=room)
    k = Budget(0.4).tokens(T)
    assert (cache.seen, cache.shift, cache.next_position, cache.length) == (T, T - k, k, k)

    selected = torch.tensor([ids])[:, policy.selected]
    plain = model.new_cache(k)
    want = model(selected, cache=plain, last_n=1)[0, -1]
    assert torch.allclose(logits, want, atol=1e-5)
    for layer, ref in zip(cache.layers, plain.layers):
        assert layer.positions()[0, 0].tolist() == list(range(k))
        assert layer.caps == [k + room] * layer.heads
        assert torch.allclose(layer.view()[0], ref.view()[0], atol=1e-5)


def test_gemfilter_decodes_like_plain_greedy_on_the_selected_prompt(tiny_lm):
    ids = prompt_ids(tiny_lm)
    filtered = tiny_lm.generate(ids, 16, kv=KVConfig("gemfilter", "0.5"))
    policy = GemFilter(Budget(0.5))
    policy.prefill(tiny_lm.model, tiny_lm.model.new_cache(len(ids)), torch.tensor([ids]), 0)
    short = tiny_lm.generate([ids[i] for i in policy.selected], 16)
    assert filtered.token_ids == short.token_ids
    assert filtered.stats["kv_selected_tokens"] == Budget(0.5).tokens(len(ids))


def test_gemfilter_at_100_percent_is_the_plain_prefill(tiny_lm):
    ids = prompt_ids(tiny_lm)
    plain = tiny_lm.generate(ids, 24)
    full = tiny_lm.generate(ids, 24, kv=KVConfig("gemfilter", "1"))
    assert full.token_ids == plain.token_ids
    assert full.stats["kv_selected_tokens"] == len(ids)


def test_gemfilter_with_prompt_lookup_is_exact(tiny_lm):
    ids = prompt_ids(tiny_lm)
    kv = KVConfig("gemfilter", "0.5")
    plain = tiny_lm.generate(ids, 32, kv=kv)
    drafted = tiny_lm.generate(ids, 32, kv=kv, method="pld")
    assert drafted.token_ids == plain.token_ids


def test_gemfilter_memory_falls_with_the_budget(tiny_lm):
    ids = prompt_ids(tiny_lm)
    allocated = [tiny_lm.generate(ids, 4, kv=KVConfig("gemfilter", b)).stats["kv_bytes_allocated"]
                 for b in ("1", "0.5", "0.25")]
    assert allocated[0] > allocated[1] > allocated[2]
    # 25 % of the prompt + room for the 4 new tokens, + positions (int64) per entry
    assert allocated[2] < 0.25 * allocated[0] * 1.25 + 4 * allocated[0] / len(ids)


@pytest.mark.parametrize("layer", ["1.5", "2", "9"])
def test_gemfilter_rejects_a_layer_outside_the_model(tiny_lm, layer):
    with pytest.raises(UserError, match="layer="):
        tiny_lm.generate(prompt_ids(tiny_lm), 2, kv=KVConfig("gemfilter", "0.5", (f"layer={layer}",)))


# --- TokenSelect ----------------------------------------------------------------------------


def decode_with_record(lm, policy, steps):
    """Prefill, then `steps` greedy tokens one forward each, recording per step and layer
    (q, keys, values, attended slots, output) of every step the policy selected at."""
    model, ids = lm.model, prompt_ids(lm)
    seen = []
    attend = policy.attend

    def recording(q, k, v, cache, layer, mask):
        out = attend(q, k, v, cache, layer, mask)
        if out is not None:
            keys, values = cache.layers[layer].view()
            seen[-1][layer] = (q.clone(), keys.clone(), values.clone(),
                               policy.last[layer].clone(), out.clone())
        return out

    policy.attend = recording
    with torch.no_grad():
        cache = model.new_cache(len(ids) + steps)
        logits = policy.prefill(model, cache, torch.tensor([ids]), room=steps)
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits.argmax()))
            seen.append({})
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[0, -1]
    return seen, tokens, cache


def soft_vote_by_hand(q, keys, n_init, topk, n_local):
    """Per query head softmax(q·k / sqrt(D)) over the middle keys, summed over every head;
    the top k of them plus the first n_init and the last n_local slots."""
    _, H, _, D = q.shape
    n, group = keys.shape[2], H // keys.shape[1]
    votes = torch.zeros(n - n_init - n_local)
    for h in range(H):
        middle = keys[0, h // group, n_init : n - n_local]
        votes += ((q[0, h, 0] @ middle.T) / math.sqrt(D)).softmax(-1)
    chosen = sorted((n_init + votes.topk(topk).indices).tolist())
    return [*range(n_init), *chosen, *range(n - n_local, n)]


def test_tokenselect_attends_to_the_soft_vote_selection_recomputed_by_hand(tiny_lm):
    budget = Budget(0.3)
    policy = TokenSelect(budget, TokenSelect.Params(initial=2, local=4, threshold=2.0))
    seen, _, _ = decode_with_record(tiny_lm, policy, 6)
    n_sel = budget.tokens(len(prompt_ids(tiny_lm)))
    assert policy.split() == (2, n_sel - 6, 4)
    assert policy.reused == 0 and policy.computed == 6 * tiny_lm.model.config.num_hidden_layers
    for step in seen:
        assert len(step) == tiny_lm.model.config.num_hidden_layers
        for q, keys, _, slots, _ in step.values():
            assert slots.tolist() == soft_vote_by_hand(q, keys, 2, n_sel - 6, 4)


def test_tokenselect_output_is_dense_attention_masked_to_the_selection(tiny_lm):
    policy = TokenSelect(Budget(0.3), TokenSelect.Params(initial=2, local=4, threshold=2.0))
    seen, _, _ = decode_with_record(tiny_lm, policy, 3)
    for step in seen:
        for q, keys, values, slots, out in step.values():
            _, H, _, D = q.shape
            group = H // keys.shape[1]
            hidden = torch.ones(keys.shape[2], dtype=torch.bool)
            hidden[slots] = False
            for h in range(H):
                logits = (q[0, h, 0] @ keys[0, h // group].T) / math.sqrt(D)
                weights = logits.masked_fill(hidden, float("-inf")).softmax(-1)
                assert torch.allclose(out[0, h, 0], weights @ values[0, h // group], atol=1e-5)


def test_tokenselect_reuses_the_selection_and_still_reads_the_newest_tokens(tiny_lm):
    """threshold -1: every step after the first reuses the first step's top tokens, while
    the initial and local slots follow the growing cache (the new token always read)."""
    n_layers = tiny_lm.model.config.num_hidden_layers
    policy = TokenSelect(Budget(0.3), TokenSelect.Params(initial=2, local=4, threshold=-1.0))
    seen, _, cache = decode_with_record(tiny_lm, policy, 5)
    assert (policy.computed, policy.reused) == (n_layers, 4 * n_layers)
    assert policy.info(cache)["kv_selection_reuse_rate"] == 0.8
    for layer in range(n_layers):
        first = seen[0][layer][3]
        for step in seen[1:]:
            slots = step[layer][3]
            n = step[layer][1].shape[2]
            assert slots[-4:].tolist() == list(range(n - 4, n))  # the newest, the new token last
            assert slots[:-4].tolist() == first[:-4].tolist()  # initial + the reused top tokens


def test_tokenselect_at_100_percent_attends_everything(tiny_lm):
    ids = prompt_ids(tiny_lm)
    plain = tiny_lm.generate(ids, 24)
    for budget in ("1", "1000"):
        full = tiny_lm.generate(ids, 24, kv=KVConfig("tokenselect", budget))
        assert full.token_ids == plain.token_ids
        assert full.stats["kv_selection_reuse_rate"] == 0.0


@torch.no_grad()
def test_tokenselect_keeps_every_entry_and_says_so(tiny_lm):
    model, ids = tiny_lm.model, prompt_ids(tiny_lm)
    _, tokens, sparse = decode_with_record(tiny_lm, TokenSelect(Budget(0.25)), 4)
    full = model.new_cache(len(ids) + 4)
    model(torch.tensor([ids + tokens]), cache=full)
    assert sparse.length == full.length == len(ids) + 4
    assert sparse.nbytes(allocated=True) == full.nbytes(allocated=True)
    stats = tiny_lm.generate(ids, 4, kv=KVConfig("tokenselect", "0.25")).stats
    assert TokenSelect.frees_memory is False and stats["kv_frees_memory"] is False
    assert stats["kv_attended"] == Budget(0.25).tokens(len(ids))


def test_tokenselect_fills_a_budget_smaller_than_its_fixed_windows():
    policy = TokenSelect(Budget(10))
    policy.prompt_len = 100
    assert policy.split() == (4, 0, 6)
    policy = TokenSelect(Budget(3), TokenSelect.Params(initial=4, local=32))
    policy.prompt_len = 100
    assert policy.split() == (2, 0, 1)


def test_tokenselect_with_a_drafter_is_refused(tiny_lm):
    with pytest.raises(UserError, match="could not stay exact"):
        tiny_lm.generate(prompt_ids(tiny_lm), 8, kv=KVConfig("tokenselect", "0.5"), method="pld")
