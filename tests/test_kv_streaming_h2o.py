"""kv policies streaming (StreamingLLM) and h2o (H2O): identity at 100 %, their rules
re-computed by hand (a fresh forward of the kept tokens at their slots; attention column
sums from captured queries and keys), slots and positions after eviction, generation
past the trained context, memory really budget-sized."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_CONTEXT
from tokenlean.kv.policies.h2o import H2O
from tokenlean.kv.policies.streaming import StreamingLLM
from tokenlean.kv.policy import Budget
from tokenlean.kv.registry import KVConfig
from tokenlean.model.config import ModelConfig
from tokenlean.model.transformer import Transformer


def ids(lm, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, lm.model.config.vocab_size, (n,), generator=g).tolist()


def per_slot_bytes(model) -> int:
    """Bytes of one slot of one KV head: key + value (fp32) + its int64 position."""
    return 2 * model.config.head_dim * 4 + 8


def rope_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE by `delta` (T,) positions, by hand as a complex product in float64:
    (x1 + i x2) * e^(i delta theta)."""
    x1, x2 = x.double().chunk(2, dim=-1)
    turn = torch.polar(torch.ones(()).double(), delta.double()[:, None] * inv_freq.double())
    z = torch.complex(x1, x2) * turn
    return torch.cat((z.real, z.imag), dim=-1).float()


@torch.inference_mode()
def step(model, cache, token: int) -> torch.Tensor:
    return model(torch.tensor([[token]]), cache=cache)[0, -1]


# --- both -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_budget_100_percent_is_the_identity(tiny_lm, name):
    prompt = ids(tiny_lm, 60)
    plain = tiny_lm.generate(prompt, 40, stop_token_ids=[])
    with_policy = tiny_lm.generate(prompt, 40, stop_token_ids=[], kv=KVConfig(name, "1"))
    assert with_policy.token_ids == plain.token_ids
    assert with_policy.completion_tokens == 40


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_allocated_kv_bytes_fall_with_the_budget(tiny_lm, name):
    prompt = ids(tiny_lm, 100)
    allocated = [tiny_lm.generate(prompt, 8, stop_token_ids=[], kv=KVConfig(name, b))
                 .stats["kv_bytes_allocated"] for b in ("1", "0.5", "0.25")]
    assert allocated[0] > allocated[1] > allocated[2]
    c = tiny_lm.model.config
    slots = c.num_hidden_layers * c.num_key_value_heads * per_slot_bytes(tiny_lm.model)
    assert allocated[2] <= (25 + 2) * slots  # a quarter of the prompt + a slot or two


# --- streaming ------------------------------------------------------------------------------


def check_slots(cache, policy):
    """Every layer and head holds the same n entries at positions 0..n-1, and the next
    token goes to position n."""
    n = cache.layers[0].length
    for kv in cache.layers:
        assert kv.uniform and kv.length == n
        for h in range(kv.heads):
            assert kv.head(h)[2][0].tolist() == list(range(n))
    assert cache.next_position == n and cache.shift == cache.seen - n
    assert n <= policy.size
    return n


def one_layer_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than the default init: attention not flat
    return model


@torch.inference_mode()
def test_streaming_cache_equals_a_fresh_forward_of_sinks_and_recent_at_their_slots():
    """One layer: a key depends on its token and position only, so the re-rotated cache
    must equal prefilling just the kept tokens (sinks + recent) at slots 0..n-1."""
    model = one_layer_model()
    stream = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(1))
    policy = StreamingLLM(Budget(40), StreamingLLM.Params(sinks=4, evict_every=8))
    cache = model.new_cache(200)
    policy.prefill(model, cache, stream[:, :90], room=60)  # chunked, several evictions
    assert cache.shift > 0
    for t in range(90, 149):  # decoding: evicts again every 8 tokens
        n = check_slots(cache, policy)
        kept = torch.cat((stream[:, :4], stream[:, t - (n - 4) : t]), dim=1)  # (1, n)
        fresh = model(torch.cat((kept, stream[:, t : t + 1]), dim=1))[0, -1]
        assert torch.allclose(step(model, cache, int(stream[0, t])), fresh, atol=1e-4), t


@torch.inference_mode()
def test_streaming_eviction_re_rotates_the_kept_keys_to_their_slots(tiny_lm):
    """Two layers: the cache after the first eviction equals the full cache's sinks and
    recent entries moved to slots 0..n-1, their keys re-rotated by hand; the next token's
    logits over both agree."""
    model = tiny_lm.model
    tokens = ids(tiny_lm, 60)
    policy = StreamingLLM(Budget(48), StreamingLLM.Params(sinks=4, evict_every=8))
    cache, full = model.new_cache(64), model.new_cache(64)
    policy.prefill(model, cache, torch.tensor([tokens[:40]]), room=20)
    model(torch.tensor([tokens[:40]]), cache=full)
    for t in range(40, 49):  # the 49th entry is one too many: 9 go, 40 stay
        assert torch.allclose(step(model, cache, tokens[t]), step(model, full, tokens[t]),
                              atol=1e-5)
    assert check_slots(cache, policy) == 40 and cache.shift == 9
    kept = torch.cat((torch.arange(4), torch.arange(13, 49)))
    slots = torch.arange(40)
    ref = model.new_cache(64)
    ref.begin(slots)
    for layer, (kv, ours) in enumerate(zip(full.layers, cache.layers)):
        keys, values = kv.view()  # (1, H_kv, 49, D) at positions 0..48
        moved = rope_by(keys[:, :, kept], slots - kept, model.inv_freq)
        got_k, got_v = ours.view()
        assert torch.allclose(got_k, moved, atol=1e-5)
        assert torch.equal(got_v, values[:, :, kept])
        ref.layers[layer].write(moved, values[:, :, kept], ref.new_pos)
    ref.advance(40)
    assert torch.allclose(step(model, cache, tokens[49]), step(model, ref, tokens[49]),
                          atol=1e-4)


def test_streaming_generates_far_past_the_trained_context_in_constant_memory(tiny_lm):
    model = tiny_lm.model
    c = model.config
    result = tiny_lm.generate(ids(tiny_lm, 20), 400, stop_token_ids=[],
                              kv=KVConfig("streaming", "64"))
    assert result.completion_tokens == 400 and 20 + 400 > 3 * TINY_CONTEXT
    slots = c.num_hidden_layers * c.num_key_value_heads * per_slot_bytes(model)
    assert result.stats["kv_bytes_allocated"] <= (64 + 1) * slots  # budget + one free slot


@torch.inference_mode()
def test_streaming_prefills_a_prompt_longer_than_the_context_in_chunks(tiny_lm):
    """300 prompt tokens (context 128), budget 64: fed 32 at a time, the cache never
    above budget + one chunk, positions below it, storage not reallocated while decoding."""
    model = tiny_lm.model
    policy = StreamingLLM(Budget(64))
    cache = model.new_cache(400)
    seen_positions = []
    forward = model.forward

    def recording(tokens, positions=None, cache=None, **kw):
        seen_positions.append(cache.next_position + tokens.shape[1] - 1)
        return forward(tokens, positions, cache, **kw)

    model.forward = recording
    try:
        policy.prefill(model, cache, torch.tensor([ids(tiny_lm, 300)]), room=100)
        storage = [kv.k.data_ptr() for kv in cache.layers]
        for t in range(100):
            step(model, cache, t + 10)
            check_slots(cache, policy)
    finally:
        del model.forward
    assert max(seen_positions) < 64 + 32
    assert cache.seen == 400 and all(kv.caps == [65] * kv.heads for kv in cache.layers)
    assert [kv.k.data_ptr() for kv in cache.layers] == storage


@pytest.mark.parametrize("budget, size", [("0.5", 50), ("30", 30)])
def test_streaming_budget_is_a_share_of_the_prompt_or_a_count(tiny_lm, budget, size):
    policy = KVConfig("streaming", budget).make()
    with torch.inference_mode():
        cache = tiny_lm.model.new_cache(140)
        policy.prefill(tiny_lm.model, cache, torch.tensor([ids(tiny_lm, 100)]), room=40)
        for t in range(40):
            step(tiny_lm.model, cache, t + 10)
            assert cache.layers[0].length <= size
    assert policy.size == size


# --- h2o ------------------------------------------------------------------------------------


def capture(policy):
    """Record, per layer and forward, the queries and the layer's keys/positions the
    policy's after_attention saw (before it evicts)."""
    log: dict[int, list[tuple]] = {}
    after = policy.after_attention

    def recording(layer, q, kv, cache):
        keys, _ = kv.view()
        log.setdefault(layer, []).append((q[0].clone(), keys[0].clone(),
                                           kv.positions()[0].clone()))
        after(layer, q, kv, cache)

    policy.after_attention = recording
    return log


def column_sums_by_hand(q, keys):
    """(H_kv, n): for every query head and query t, softmax(q_t . k / sqrt(D)) over the
    keys up to its own (the T queries own the last T keys), added to its KV head."""
    H, T, D = q.shape
    H_kv, n, _ = keys.shape
    group = H // H_kv
    out = torch.zeros(H_kv, n)
    for h in range(H):
        for t in range(T):
            visible = n - T + t + 1
            logits = keys[h // group, :visible] @ q[h, t] / math.sqrt(D)
            out[h // group, :visible] += logits.softmax(-1)
    return out


def heavy_hitters_by_hand(scores, size, recent):
    """Per head, ascending slots: the last `recent`, plus the best-scored of the others."""
    n = scores.shape[1]
    out = []
    for row in scores:
        others = row[: n - recent].topk(size - recent).indices.tolist()
        out.append(sorted(others + list(range(n - recent, n))))
    return out


@torch.inference_mode()
def test_h2o_keeps_heavy_hitters_and_recent_entries_recomputed_by_hand(tiny_lm):
    """Prefill then 12 decode steps at budget 20 (10 recent): every step's selection is the
    hand-made accumulation of column sums over what each head still holds + the rule."""
    model = tiny_lm.model
    prompt = ids(tiny_lm, 50)
    policy = H2O(Budget(20), H2O.Params(recent=0.5))
    log = capture(policy)
    cache, full = model.new_cache(70), model.new_cache(70)
    policy.prefill(model, cache, torch.tensor([prompt]), room=12)
    model(torch.tensor([prompt]), cache=full)
    tokens = [int(t) for t in ids(tiny_lm, 12, seed=3)]
    for t in tokens:
        step(model, cache, t)
    for layer, forwards in log.items():
        kv = cache.layers[layer]
        scores = held = None
        for q, keys, pos in forwards:
            fresh = column_sums_by_hand(q, keys)
            if scores is not None:  # what the head held, then the new entry
                assert torch.equal(pos[:, :-1], held)
                fresh[:, :-1] += scores
            index = heavy_hitters_by_hand(fresh, 20, 10)
            held = torch.stack([pos[h, index[h]] for h in range(kv.heads)])
            scores = torch.stack([fresh[h, index[h]] for h in range(kv.heads)])
        assert torch.equal(kv.positions()[0], held)  # original positions, ascending
        assert all(row == sorted(row) for row in held.tolist())
        assert torch.allclose(policy.scores[layer], scores, atol=1e-4)
        # a kept prompt entry is the full prefill's key at its stored (original) position
        full_keys, _ = full.layers[layer].view()
        ours, _ = kv.view()
        for h in range(kv.heads):
            prompt_slots = held[h] < len(prompt)
            assert torch.allclose(ours[0, h, prompt_slots],
                                  full_keys[0, h, held[h][prompt_slots]], atol=1e-5)
    assert cache.next_position == cache.seen == 62


@torch.inference_mode()
def test_h2o_cache_stays_at_the_budget_while_decoding_without_reallocating(tiny_lm):
    model = tiny_lm.model
    policy = H2O(Budget(0.25))
    cache = model.new_cache(200)
    policy.prefill(model, cache, torch.tensor([ids(tiny_lm, 80)]), room=100)
    storage = [kv.k.data_ptr() for kv in cache.layers]
    assert all(kv.lens == [20] * kv.heads and kv.caps == [21] * kv.heads for kv in cache.layers)
    for t in range(40):
        step(model, cache, t + 10)
        for kv in cache.layers:
            assert kv.uniform and kv.lens == [20] * kv.heads
            assert kv.positions()[0, :, -1].tolist() == [cache.seen - 1] * kv.heads
    assert [kv.k.data_ptr() for kv in cache.layers] == storage
    assert cache.next_position == 120


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_a_question_fed_after_the_compressed_prompt_fits_and_memory_shrinks_back(tiny_lm, name):
    """kvpress's protocol: 30 question tokens in one forward on the budget-sized cache
    (storage grows for it), then decoding back at budget + 1 slots."""
    model = tiny_lm.model
    c = model.config
    result = tiny_lm.generate(ids(tiny_lm, 80), 12, stop_token_ids=[],
                              kv=KVConfig(name, "0.25"), question=ids(tiny_lm, 30, seed=5))
    assert result.completion_tokens == 12
    slots = c.num_hidden_layers * c.num_key_value_heads * per_slot_bytes(model)
    assert result.stats["kv_bytes_allocated"] <= (20 + 1) * slots


@pytest.mark.parametrize("chunk_elements", [1, 4 * 30 * 3, 1 << 24])
def test_h2o_column_sums_in_query_chunks_equal_the_hand_computation(monkeypatch, chunk_elements):
    """12 new queries over 30 keys (18 cached before them), one query or three at a time
    or all at once: the same sums."""
    from tokenlean.kv.policies import h2o

    monkeypatch.setattr(h2o, "QUERY_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, 4, 12, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    want = column_sums_by_hand(q[0], keys[0])
    assert torch.allclose(h2o.column_sums(q, keys), want, atol=1e-5)
    assert torch.allclose(want.sum(), torch.tensor(4 * 12.0))  # each query's weights sum to 1
