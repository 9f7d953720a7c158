"""kv policies infllm and duo: identity at 100 %, their rules re-computed by hand from
captured queries and keys, slots and positions after eviction, memory really freed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_CONTEXT
from tokenlean.decode import Generation, decode_steps
from tokenlean.errors import UserError
from tokenlean.kv import calibrate
from tokenlean.kv.registry import KVConfig, make_policy
from tokenlean.sampling import SamplingParams

INFLLM = ["initial=4", "local=16", "block=4", "representatives=2", "topk=2", "chunk=8"]


def ids(lm, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, lm.model.config.vocab_size, (n,), generator=g).tolist()


def generate(lm, prompt: list[int], n: int, policy=None):
    gen = Generation(decode_steps(lm, prompt, n, SamplingParams(), stop_token_ids=[],
                                  policy=policy))
    for _ in gen:
        pass
    return gen.result


def feed(lm, policy, prompt: list[int], n: int, room: int | None = None):
    """Prefill through the policy, then n greedy steps: the cache and the tokens."""
    model = lm.model
    with torch.inference_mode():
        cache = model.new_cache(len(prompt) + n + 1)
        room = n if room is None else room
        logits = policy.prefill(model, cache, torch.tensor([prompt]), room)
        out = [int(logits.argmax())]
        for _ in range(n - 1):
            out.append(int(model(torch.tensor([[out[-1]]]), cache=cache)[0, -1].argmax()))
    return cache, out


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (..., T, D) at positions pos (T,), by hand in float64."""
    angle = pos.double()[:, None] * inv_freq.double()  # (T, D/2)
    x = x.double()
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def capture(policy):
    """Wrap the policy's hooks: per layer, per step, the q, k, v fed, the output, what the
    store held before the step (infllm) and the selection made (`policy.selected`)."""
    log: dict[int, list[dict]] = {}
    attend, after = policy.attend, policy.after_attention

    def attend_hook(q, k, v, cache, layer, mask):
        store = policy.stores[layer] if hasattr(policy, "stores") else None
        before = len(store) if store is not None else 0
        reps = store.reps.clone() if before else None
        policy.selected.clear()
        out = attend(q, k, v, cache, layer, mask)
        log.setdefault(layer, []).append(dict(
            q=q[0].clone(), k=k[0].clone(), v=v[0].clone(), pos=cache.new_pos[0].clone(),
            out=None if out is None else out[0].clone(), reps=reps, before=before,
            selected={key: sel.clone() for key, sel in policy.selected.items()}))
        return out

    def after_hook(layer, q, kv, cache):
        after(layer, q, kv, cache)
        if hasattr(policy, "stores"):
            log[layer][-1]["stored"] = len(policy.stores[layer])

    policy.attend, policy.after_attention = attend_hook, after_hook
    return log


# --- infllm ---------------------------------------------------------------------------------


def test_infllm_is_the_identity_when_the_prompt_fits(tiny_lm):
    prompt = ids(tiny_lm, 30)
    plain = generate(tiny_lm, prompt, 12).token_ids
    assert generate(tiny_lm, prompt, 12, make_policy("infllm")).token_ids == plain
    small = make_policy("infllm", None, ["initial=8", "local=40", "chunk=4"])
    assert generate(tiny_lm, prompt, 12, small).token_ids == plain
    assert not any(len(s) for s in small.stores)


@pytest.mark.parametrize("variant", [[], ["scoring=max", "query=last"]])
def test_infllm_representatives_retrieval_and_attention_match_the_rule(tiny_lm, variant):
    """The paper's rule (q̄ over the step's queries, against the mean representative) and
    the max variant (the step's last query, against the best representative)."""
    policy = make_policy("infllm", None, INFLLM + variant)
    log = capture(policy)
    cache, _ = feed(tiny_lm, policy, ids(tiny_lm, 96, seed=1), 10)
    p, inv_freq = policy.params, tiny_lm.model.inv_freq
    checked = 0
    for layer, steps in log.items():
        store = policy.stores[layer]
        K = {int(t): s["k"][:, i] for s in steps for i, t in enumerate(s["pos"])}  # (H_kv, D)
        V = {int(t): s["v"][:, i] for s in steps for i, t in enumerate(s["pos"])}
        H_kv, D = next(iter(K.values())).shape
        group = steps[0]["q"].shape[0] // H_kv
        # representative keys: top-r of r_m = sum q_{m+j}·k_m (j = 1..local, queries fed
        # up to the step that evicted the block), de-rotated to 0 (and averaged: mean)
        for b, bpos in enumerate(store.positions):
            evicted = next(i for i, s in enumerate(steps) if s["stored"] > b)
            Q = [(int(t), s["q"][:, i])
                 for s in steps[: evicted + 1] for i, t in enumerate(s["pos"])]
            r = torch.zeros(H_kv, len(bpos), dtype=torch.float64)
            for j, m in enumerate(bpos.tolist()):
                for t, qt in Q:
                    if 1 <= t - m <= p.local:
                        qg = qt.double().view(H_kv, group, D)
                        r[:, j] += (qg * K[m].double()[:, None]).sum(dim=(1, 2))
            top = r.topk(p.representatives, dim=-1).indices
            for h in range(H_kv):
                picked = torch.stack([K[int(bpos[i])][h] for i in top[h]])
                at = torch.stack([-bpos[i] for i in top[h]])
                rep = rope(picked, at, inv_freq)  # (r, D)
                if p.scoring == "mean":
                    rep = rep.mean(0, keepdim=True)
                torch.testing.assert_close(store.reps[b, 0, h].double(), rep, atol=1e-4, rtol=1e-4)
        # each step with a store: retrieval by q̄·r, then attention over the slots
        for s in (s for s in steps if s["before"]):
            T = len(s["pos"])
            q0 = rope(s["q"], -s["pos"], inv_freq).view(H_kv, group, T, D)
            if p.query == "last":
                q0 = q0[:, :, -1:]
            dots = torch.einsum("hd,nhrd->hnr", q0.mean(dim=(1, 2)), s["reps"][:, 0].double())
            scores = dots.amax(-1) if p.scoring == "max" else dots.mean(-1)
            want = scores.topk(min(p.topk, s["before"]), dim=-1).indices.sort(dim=-1).values
            assert torch.equal(s["selected"][layer], want)
            stored = torch.cat(store.positions[: s["before"]]).tolist()
            seen = int(s["pos"][-1]) + 1
            local = [t for t in range(p.initial, seen) if t not in stored]
            for h in range(H_kv):
                blocks = [int(t) for b in want[h] for t in store.positions[b]]
                order = list(range(p.initial)) + blocks + local  # original positions, by slot
                S = len(order)
                keys = rope(torch.stack([K[t][h] for t in order]),
                            torch.arange(S) - torch.tensor(order), inv_freq)
                vals = torch.stack([V[t][h] for t in order]).double()
                q = rope(s["q"][h * group : (h + 1) * group], torch.arange(S - T, S) - s["pos"],
                         inv_freq)
                logits = q @ keys.T / math.sqrt(D)  # (g, T, S)
                logits[..., S - T :] += torch.full((T, T), float("-inf")).triu(1)
                out = logits.softmax(-1) @ vals
                torch.testing.assert_close(s["out"][h * group : (h + 1) * group].double(), out,
                                           atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 10  # prefill chunks and decode steps both retrieved


def test_infllm_slots_positions_and_bounded_memory(tiny_lm):
    policy = make_policy("infllm", None, INFLLM)
    cache, _ = feed(tiny_lm, policy, ids(tiny_lm, 96, seed=2), 13)
    p = policy.params
    for kv, store in zip(cache.layers, policy.stores):
        assert kv.uniform and kv.length <= p.initial + p.local
        assert kv.caps[0] <= p.initial + p.local + p.chunk  # reallocated, not just masked
        held = kv.positions()[0, 0].tolist()
        stored = torch.cat(store.positions).tolist()
        assert held == sorted(held) and stored == sorted(stored)
        assert held[: p.initial] == list(range(p.initial))
        assert sorted(held + stored) == list(range(cache.seen))  # each position exactly once
        assert all(k.shape == (1, kv.heads, p.block, kv.head_dim) for k in store.keys)
        for k, pos in zip(store.keys, store.positions):  # blocks hold what was evicted
            assert len(pos) == p.block and k.device == cache.device
    info = policy.info(cache)
    assert info["kv_store_blocks"] == sum(len(s) for s in policy.stores) > 0


def test_infllm_runs_four_times_past_the_context(tiny_lm):
    prompt = ids(tiny_lm, 4 * TINY_CONTEXT, seed=3)
    with pytest.raises(UserError):
        generate(tiny_lm, prompt, 16)  # the plain model cannot take it
    policy = make_policy("infllm", None, INFLLM)
    result = generate(tiny_lm, prompt, 16, policy)
    assert len(result.token_ids) == 16
    assert policy.max_position < TINY_CONTEXT
    assert result.stats["kv_max_position"] == policy.max_position


def test_infllm_budget_caps_the_retrieved_tokens():
    assert make_policy("infllm", "256").topk == 2  # 256 tokens of 128-token blocks
    assert make_policy("infllm", "0.5").topk == 4  # a fraction: the Params decide
    with pytest.raises(UserError):
        make_policy("infllm", None, ["representatives=9", "block=8"])
    for bad, valid in (("scoring=sum", "mean, max"), ("query=first", "mean, last")):
        with pytest.raises(UserError, match=valid):
            make_policy("infllm", None, [bad])


# --- duo ------------------------------------------------------------------------------------

DUO = ["sinks=2", "recent=8", "page=4"]


@pytest.fixture
def duo_calibration(tiny_lm, tmp_path):
    """A calibration file that makes heads (0, 0) and (1, 1) the retrieval heads."""
    path = tmp_path / "duo.json"
    path.write_text(json.dumps({"model": "tiny", "digest": calibrate.model_digest(tiny_lm.model),
                                "sinks": 2, "recent": 8, "scores": [[1.0, 0.0], [0.0, 1.0]]}))
    return [*DUO, f"calibration={path}"]


def test_duo_is_the_identity_at_full_budget(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path))
    prompt = ids(tiny_lm, 40, seed=4)
    plain = generate(tiny_lm, prompt, 12).token_ids
    assert generate(tiny_lm, prompt, 12, make_policy("duo", "1.0", DUO)).token_ids == plain
    assert not (tmp_path / "kv-calibration").exists()  # no calibration needed


def test_duo_streaming_heads_are_cut_and_freed(tiny_lm, duo_calibration):
    """After prefill a streaming head holds sinks + recent with room for one page (4), a
    retrieval head everything with room for the whole generation (12)."""
    n, room, page = 60, 12, 4
    policy = make_policy("duo", "0.5", duo_calibration)
    with torch.inference_mode():
        cache = tiny_lm.model.new_cache(n + room)
        policy.prefill(tiny_lm.model, cache, torch.tensor([ids(tiny_lm, n, seed=5)]), room)
    retrieval = [[True, False], [False, True]]
    assert policy.retrieval.tolist() == retrieval
    D = cache.head_dim
    kv_slot, pos_slot = 2 * D * 4, 8  # fp32 keys + values; the int64 position (ragged layer)
    expected = 0
    for kv, heads in zip(cache.layers, retrieval):
        for h, is_retrieval in enumerate(heads):
            pos = kv.head(h)[2][0].tolist()
            if is_retrieval:
                assert pos == list(range(n)) and kv.caps[h] == n + room
            else:
                assert pos == [0, 1] + list(range(n - 8, n)) and kv.caps[h] == 10 + page
        expected += (kv_slot + pos_slot) * sum(kv.caps)
    full = len(cache.layers) * cache.n_kv_heads * (n + room) * kv_slot
    assert cache.nbytes(allocated=True) == expected
    slots = (n + room) + (10 + page)  # per layer, one retrieval and one streaming head
    assert full - expected == 2 * (kv_slot * (2 * (n + room) - slots) - pos_slot * slots)


def test_duo_streaming_heads_fed_a_chunk_longer_than_their_room(tiny_lm, tmp_path):
    """All heads streaming: a 7-token chunk (more than the page of room) gives the logits
    that feeding its tokens one by one gives, and the heads still hold sinks + recent."""
    path = tmp_path / "duo.json"
    path.write_text(json.dumps({"model": "tiny", "digest": calibrate.model_digest(tiny_lm.model),
                                "sinks": 2, "recent": 8, "scores": [[0.0, 0.0], [0.0, 0.0]]}))
    args = [*DUO, "retrieval=0", f"calibration={path}"]
    prompt, chunk = ids(tiny_lm, 40, seed=8), ids(tiny_lm, 7, seed=9)
    logits = []
    for steps in ([chunk], [[t] for t in chunk]):
        policy = make_policy("duo", "0.5", args)
        with torch.inference_mode():
            cache = tiny_lm.model.new_cache(len(prompt) + len(chunk))
            policy.prefill(tiny_lm.model, cache, torch.tensor([prompt]), len(chunk))
            for part in steps:
                out = tiny_lm.model(torch.tensor([part]), cache=cache)[0, -1]
        logits.append(out)
        for kv in cache.layers:
            for h in range(kv.heads):
                held = kv.head(h)[2][0].tolist()
                assert held[:2] == [0, 1] and held[-8:] == list(range(39, 47))
                assert kv.caps[h] <= 10 + 7
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_duo_decoding_matches_quest_and_streaming_by_hand(tiny_lm, duo_calibration):
    policy = make_policy("duo", "0.5", duo_calibration)
    log = capture(policy)
    cache, _ = feed(tiny_lm, policy, ids(tiny_lm, 64, seed=6), 20)
    p, checked = policy.params, 0
    for layer, steps in log.items():
        K = {int(t): s["k"][:, i] for s in steps for i, t in enumerate(s["pos"])}  # (H_kv, D)
        V = {int(t): s["v"][:, i] for s in steps for i, t in enumerate(s["pos"])}
        H_kv, D = next(iter(K.values())).shape
        group = steps[0]["q"].shape[0] // H_kv
        for s in steps[1:]:  # the decode steps
            now = int(s["pos"][0])
            q = s["q"][:, 0].double()  # (H, D)
            for h in range(H_kv):
                qg = q[h * group : (h + 1) * group]
                if policy.retrieval[layer, h]:
                    keys = torch.stack([K[t][h] for t in range(now + 1)]).double()
                    pages = keys.split(p.page)
                    lo = torch.stack([pg.min(0).values for pg in pages])
                    hi = torch.stack([pg.max(0).values for pg in pages])
                    bound = torch.maximum(qg[:, None] * lo, qg[:, None] * hi).sum(dim=(0, 2))
                    bound[-1] = math.inf
                    chosen = math.ceil(0.5 * (now + 1)) // p.page
                    want = bound.topk(chosen).indices.sort().values
                    assert torch.equal(s["selected"][layer, h], want)
                    slots = [t for t in range(now + 1) if t // p.page in want.tolist()]
                else:
                    slots = [t for t in range(now + 1) if t < p.sinks or now - t < p.recent]
                    held = cache.layers[layer].head(h)[2][0].tolist()
                    assert held[: p.sinks] == list(range(p.sinks)) and held == sorted(held)
                    assert len(held) <= p.sinks + p.recent + p.page
                    assert cache.layers[layer].caps[h] <= p.sinks + p.recent + p.page
                keys = torch.stack([K[t][h] for t in slots]).double()
                vals = torch.stack([V[t][h] for t in slots]).double()
                out = (qg @ keys.T / math.sqrt(D)).softmax(-1) @ vals
                torch.testing.assert_close(s["out"][h * group : (h + 1) * group, 0].double(),
                                           out, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == 2 * 2 * 19


def test_duo_calibration_is_written_and_read_back(tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path))
    prompt = ids(tiny_lm, 40, seed=7)
    first = generate(tiny_lm, prompt, 6, make_policy("duo", "0.5", DUO)).token_ids
    assert "calibrating" in capsys.readouterr().err
    path = tmp_path / "kv-calibration" / f"{calibrate.model_name(tiny_lm.model)}.duo.json"
    data = json.loads(path.read_text())
    assert data["digest"] == calibrate.model_digest(tiny_lm.model)
    assert (data["sinks"], data["recent"]) == (2, 8)
    scores = torch.tensor(data["scores"])
    assert scores.shape == (2, 2) and torch.isfinite(scores).all() and (scores >= 0).all()

    def boom(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(calibrate, "head_scores", boom)
    policy = make_policy("duo", "0.5", DUO)
    assert generate(tiny_lm, prompt, 6, policy).token_ids == first
    assert policy.retrieval.tolist() == calibrate.retrieval_heads(data["scores"], 0.5).tolist()
    assert "calibrating" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["duo", "infllm"])
def test_decode_time_policies_refuse_drafters(tiny_lm, name):
    with pytest.raises(UserError, match="speculative decoding"):
        tiny_lm.generate(ids(tiny_lm, 20), 4, method="pld", kv=KVConfig(name, "0.5"))
