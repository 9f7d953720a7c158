"""KV-cache policies, all of them through the registry: identity at budget 100 %, the
composition rule with drafters, budgets and names checked, memory really freed; and the
cache underneath (slots vs positions, ragged heads) and SnapKV/AdaKV's selection rule."""

from __future__ import annotations

import math

import pytest
import torch

from cli_run import assert_user_error, run_cli
from tokenlean.errors import UserError
from tokenlean.kv.policies.adakv import AdaKV
from tokenlean.kv.policies.snapkv import SnapKV
from tokenlean.kv.policy import Budget
from tokenlean.kv.registry import POLICIES, KVConfig, make_policy

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n" * 3


def prompt_ids(lm) -> list[int]:
    return lm.encode(PROMPT)


# --- every policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_budget_100_percent_is_the_identity(tiny_lm, name):
    ids = prompt_ids(tiny_lm)
    plain = tiny_lm.generate(ids, 24)
    with_policy = tiny_lm.generate(ids, 24, kv=KVConfig(name, "1"))
    assert with_policy.token_ids == plain.token_ids
    assert with_policy.stats["kv_policy"] == name


@pytest.mark.parametrize("name", [n for n, cls in POLICIES.items() if not cls.decode_time])
@pytest.mark.parametrize("method", ["pld", "hybrid"])
def test_prefill_time_policy_with_drafting_equals_plain_decoding_under_it(tiny_lm, name, method):
    ids = prompt_ids(tiny_lm)
    kv = KVConfig(name, "0.5")
    plain = tiny_lm.generate(ids, 32, kv=kv)
    drafted = tiny_lm.generate(ids, 32, kv=kv, method=method)
    assert drafted.token_ids == plain.token_ids
    assert drafted.stats["steps"] <= plain.stats["steps"]


@pytest.mark.parametrize("name", [n for n, cls in POLICIES.items() if cls.decode_time])
def test_decode_time_policy_with_drafting_is_refused_up_front(tiny_lm, name):
    with pytest.raises(UserError, match="could not stay exact"):
        tiny_lm.generate(prompt_ids(tiny_lm), 8, kv=KVConfig(name, "0.5"), method="pld")


def test_cli_refuses_a_decode_time_policy_with_a_drafter_in_one_line(tiny_model_dir, capsys):
    decode_time = next(n for n, cls in POLICIES.items() if cls.decode_time)
    assert_user_error(*run_cli(capsys, "generate", "--model", str(tiny_model_dir), "-p", "x",
                               "--method", "pld", "--kv-policy", decode_time,
                               "--kv-budget", "0.5"), "could not stay exact")


@pytest.mark.parametrize("args, message", [
    (["--kv-policy", "nope"], "unknown kv policy"),
    (["--kv-policy", "snapkv", "--kv-budget", "0"], "above 0"),
    (["--kv-policy", "snapkv", "--kv-budget", "-1"], "above 0"),
    (["--kv-policy", "snapkv", "--kv-budget", "half"], "must be a fraction"),
    (["--kv-policy", "snapkv", "--kv-budget", "1.5"], "whole number"),
    (["--kv-policy", "snapkv", "--kv-budget", "nan"], "above 0"),
    (["--kv-budget", "0.5"], "needs a kv policy"),
    (["--kv-policy", "snapkv", "--kv-arg", "windw=3"], "unknown option"),
    (["--kv-policy", "snapkv", "--kv-arg", "window=big"], "must be a int"),
])
def test_bad_policy_budget_or_option_is_a_one_line_error(tiny_model_dir, capsys, args, message):
    assert_user_error(*run_cli(capsys, "generate", "--model", str(tiny_model_dir), "-p", "x",
                               *args), message)


def test_generate_cli_runs_with_a_policy_and_reports_its_bytes(tiny_model_dir, capsys):
    import json

    rc, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "-p", PROMPT,
                           "-n", "8", "--kv-policy", "snapkv", "--kv-budget", "25%", "--json")
    assert rc == 0, err
    stats = json.loads(out)["stats"]
    assert stats["kv_policy"] == "snapkv" and stats["kv_budget"] == "0.25"
    assert 0 < stats["kv_bytes"] <= stats["kv_bytes_allocated"]


@pytest.mark.parametrize("text, tokens_of_100", [("0.25", 25), ("25%", 25), ("1", 100),
                                                 ("40", 40), ("400", 100), ("0.001", 1)])
def test_budget_is_a_fraction_or_a_token_count(text, tokens_of_100):
    assert Budget.parse(text).tokens(100) == tokens_of_100


def test_every_policy_declares_what_it_is():
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.summary and "arXiv" in cls.paper, name
        policy = make_policy(name, "0.5")
        assert policy.budget == Budget(0.5)


# --- the cache: slots are not positions -----------------------------------------------------


@torch.no_grad()
def test_after_eviction_the_next_token_takes_the_position_after_everything_seen(tiny_lm):
    model = tiny_lm.model
    ids = torch.tensor([prompt_ids(tiny_lm)[:20]])
    cache = model.new_cache(32)
    model(ids, cache=cache)
    kept = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 15, 16, 17, 18, 19])
    cache.keep(kept)
    assert cache.length == 14 and cache.seen == 20 and cache.next_position == 20
    for layer in cache.layers:
        assert layer.positions()[0, 0].tolist() == kept.tolist()

    # the same as the full cache with the evicted slots masked, the new token at 20
    nxt = torch.tensor([[5]])
    full = model.new_cache(32)
    model(ids, cache=full)
    mask = torch.zeros(1, 21, dtype=torch.bool)
    mask[0, kept] = mask[0, 20] = True
    want = model(nxt, cache=full, mask=mask)
    assert torch.allclose(model(nxt, cache=cache), want, atol=1e-5)
    assert full.next_position == cache.next_position == 21


@torch.no_grad()
def test_ragged_heads_attend_as_a_per_head_mask_over_the_full_cache(tiny_lm):
    """Head 0 keeps 6 entries, head 1 all 16: the ragged layers' next logits equal the full
    cache's with head 0's query group masked to those 6."""
    model = tiny_lm.model
    H, H_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    ids = torch.tensor([prompt_ids(tiny_lm)[:16]])
    head0 = torch.tensor([0, 2, 5, 9, 14, 15])
    ragged = model.new_cache(24)
    model(ids, cache=ragged)
    for layer in ragged.layers:
        layer.keep([head0, torch.arange(16)])
        layer.shrink(4)
    assert not ragged.layers[0].uniform and ragged.layers[0].caps == [10, 20]

    full = model.new_cache(24)
    model(ids, cache=full)
    nxt = torch.tensor([[7, 3]])
    mask = torch.ones(1, H, 2, 18, dtype=torch.bool)
    hidden = torch.ones(16, dtype=torch.bool)
    hidden[head0] = False
    mask[:, : H // H_kv, :, :16] &= ~hidden
    mask[:, :, 0, 17] = False  # causal among the two new tokens
    want = model(nxt, cache=full, mask=mask)
    assert torch.allclose(model(nxt, cache=ragged), want, atol=1e-5)


# --- SnapKV and AdaKV: the rule, recomputed by hand; memory ---------------------------------


def capture_queries_and_keys(lm, ids, policy):
    """Run the policy's prefill, recording each layer's (q, keys) just before it compresses."""
    seen = {}
    compress = policy.after_attention

    def recording(layer, q, kv, cache):
        if policy.prefilling:
            keys, _ = kv.view()
            seen[layer] = (q.clone(), keys.clone())
        compress(layer, q, kv, cache)

    policy.after_attention = recording
    cache = lm.model.new_cache(len(ids) + 8)
    policy.prefill(lm.model, cache, torch.tensor([ids]), room=8)
    return seen, cache


def snapkv_scores_by_hand(q, keys, window, kernel):
    """Per KV head: softmax attention of the last `window` queries (causal), averaged over
    the window and the head's query group, then a mean over a centred `kernel` window."""
    _, H, T, D = q.shape
    H_kv, n = keys.shape[1], keys.shape[2]
    group = H // H_kv
    scores = torch.zeros(H_kv, n)
    for h in range(H):
        for t in range(T - window, T):
            logits = (q[0, h, t] @ keys[0, h // group].T) / math.sqrt(D)
            logits[t + 1 :] = float("-inf")
            scores[h // group] += logits.softmax(-1) / (window * group)
    pooled = scores.clone()  # the window's own entries are kept whatever their score
    for i in range(n - window):  # a centred mean, zeros past the ends
        lo, hi = max(0, i - kernel // 2), min(n - window, i + kernel // 2 + 1)
        pooled[:, i] = scores[:, lo:hi].sum(-1) / kernel
    return pooled


def test_snapkv_keeps_the_window_and_the_top_scored_entries_of_each_head(tiny_lm):
    ids = prompt_ids(tiny_lm)
    policy = SnapKV(Budget(0.3), SnapKV.Params(window=8, kernel=5))
    seen, cache = capture_queries_and_keys(tiny_lm, ids, policy)
    n, keep = len(ids), Budget(0.3).tokens(len(ids))
    for layer, (q, keys) in seen.items():
        scores = snapkv_scores_by_hand(q, keys, 8, 5)
        for h in range(keys.shape[1]):
            others = scores[h, : n - 8].topk(keep - 8).indices
            want = sorted([*others.tolist(), *range(n - 8, n)])
            assert cache.layers[layer].positions()[0, h].tolist() == want


def test_adakv_shares_the_layer_budget_between_heads_and_frees_the_rest(tiny_lm):
    ids = prompt_ids(tiny_lm)
    budget, window, alpha, room = Budget(0.3), 4, 0.2, 8
    policy = AdaKV(budget, AdaKV.Params(window=window, kernel=5, alpha=alpha))
    seen, cache = capture_queries_and_keys(tiny_lm, ids, policy)
    n, keep = len(ids), budget.tokens(len(ids))
    for layer, (q, keys) in seen.items():
        kv = cache.layers[layer]
        H_kv = keys.shape[1]
        scores = snapkv_scores_by_hand(q, keys, window, 5)
        scores[:, n - window :] = float("inf")  # the window always stays
        floor = max(window, int(alpha * keep))
        kept = set()
        for h in range(H_kv):
            kept |= {(h, int(i)) for i in scores[h].topk(floor).indices}
        rest = sorted(((float(scores[h, i]), h, i) for h in range(H_kv) for i in range(n)
                       if (h, i) not in kept), reverse=True)
        kept |= {(h, i) for _, h, i in rest[: H_kv * keep - len(kept)]}
        for h in range(H_kv):
            assert kv.head(h)[2][0].tolist() == sorted(i for g, i in kept if g == h)
        assert sum(kv.lens) == H_kv * keep
        assert kv.caps == [length + room for length in kv.lens]  # reallocated to what it holds


@pytest.mark.parametrize("name", ["snapkv", "adakv"])
def test_allocated_kv_bytes_fall_in_proportion_to_the_budget(tiny_lm, name):
    ids = prompt_ids(tiny_lm)
    full = tiny_lm.generate(ids, 4, kv=KVConfig(name, "1")).stats["kv_bytes_allocated"]
    quarter = tiny_lm.generate(ids, 4, kv=KVConfig(name, "0.25")).stats["kv_bytes_allocated"]
    # 25 % of the prompt + room for the 4 new tokens, + positions (int64) per entry
    assert quarter < 0.25 * full * 1.25 + 4 * full / len(ids)


# --- the server: one policy for every request -----------------------------------------------


def test_server_applies_its_kv_policy_to_every_request(tiny_lm):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tokenlean.serve.app import create_app

    kv = KVConfig("snapkv", "0.25")
    with TestClient(create_app(tiny_lm, kv=kv)) as client:
        models = client.get("/v1/models").json()["data"][0]
        assert models["kv_policy"] == "snapkv@0.25"
        body = {"model": models["id"], "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text == tiny_lm.generate(PROMPT, 12, kv=kv).text


def test_serve_cli_checks_the_policy_before_loading_the_model(capsys):
    assert_user_error(*run_cli(capsys, "serve", "--model", "/no/such/model",
                               "--kv-policy", "snapkv", "--kv-budget", "0"), "above 0")
