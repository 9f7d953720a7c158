"""The kvpress peer: kvpress runs in its own environment, in a separate worker process.

The end-to-end tests need that environment (`kvpress_peer.setup_command()`) and are
skipped without it; the error messages are checked everywhere.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from tokenlean.bench import kvpress_peer
from tokenlean.bench.kvpress_peer import (
    kvpress_python,
    kvpress_selection,
    run_kvpress_peer,
    setup_command,
)
from tokenlean.errors import UserError

needs_kvpress = pytest.mark.skipif(kvpress_python() is None,
                                   reason="no kvpress environment (kvpress_peer.setup_command())")
N_CONTEXT, N_QUESTION, N_NEW = 90, 6, 8  # the context passes SnapKV's 64-query window


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def sample(tiny_model_dir):
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    return {"task": "niah_single", "context_ids": _ids(N_CONTEXT, 1, vocab),
            "question_ids": _ids(N_QUESTION, 2, vocab), "answers": ["1234567"],
            "context_tokens": N_CONTEXT + N_QUESTION + N_NEW}


def tokenlean_greedy(folder, ids: list[int], n: int) -> list[int]:
    from tokenlean.model.load import load_model

    model = load_model(folder, device="cpu", dtype="float32")
    cache = model.new_cache(len(ids) + n)
    out = []
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            logits = model(tokens, cache=cache, last_n=1)
            out.append(int(logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]])
    return out


@needs_kvpress
def test_full_cache_matches_tokenlean_and_snapkv_compresses(tiny_model_dir, sample):
    lines = []
    rows = run_kvpress_peer([sample], tiny_model_dir, presses=["full", "snapkv"], budgets=[0.5],
                            max_new_tokens=N_NEW, threads=1, eos_ids=[], progress=lines.append)
    full, snap = rows
    assert full["press"] == "full" and full["budget"] == 1.0 and "error" not in full
    want = tokenlean_greedy(tiny_model_dir, sample["context_ids"] + sample["question_ids"], N_NEW)
    assert full["generated_ids"] == want
    assert snap["press_class"] == "SnapKVPress" and snap["compression_ratio"] == 0.5
    assert len(snap["generated_ids"]) == N_NEW and "error" not in snap
    layers, kv_heads = 2, 2
    assert full["kv_entries"] == layers * kv_heads * N_CONTEXT
    assert snap["kv_entries"] == layers * kv_heads * (N_CONTEXT // 2)
    assert snap["kv_bytes"] * 2 == full["kv_bytes"]
    assert snap["prefill_s"] > 0 and snap["decode_s_per_token"] > 0
    assert full["kvpress"] and any("snapkv budget 0.5" in line for line in lines)


@needs_kvpress
@pytest.mark.parametrize("window", [16, 32])
def test_tokenlean_snapkv_keeps_what_kvpress_snapkv_keeps(tiny_model_dir, sample, window):
    """The same rule on the same weights and ids: the same entries kept, layer by layer and
    head by head (tokenlean's policy, not a recomputation)."""
    from tokenlean.kv.policies.snapkv import SnapKV
    from tokenlean.kv.policy import Budget
    from tokenlean.model.load import load_model

    ids, ratio = sample["context_ids"], 0.5
    theirs = kvpress_selection(tiny_model_dir, ids, [{"name": "snapkv", "ratio": ratio,
                                                      "args": {"window_size": window}}])[0]
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    cache = model.new_cache(N_CONTEXT)
    policy = SnapKV(Budget(1 - ratio), SnapKV.Params(window=window, kernel=5))
    with torch.no_grad():
        policy.prefill(model, cache, torch.tensor([ids]), room=0)
    ours = [layer.positions()[0].tolist() for layer in cache.layers]
    assert ours == theirs["layers"]


@needs_kvpress
def test_selection_streaming_and_knorm_match_their_rules(tiny_model_dir, sample):
    from tokenlean.model.load import load_model

    ids, ratio = sample["context_ids"], 0.5
    kept = int(N_CONTEXT * (1 - ratio))
    got = kvpress_selection(tiny_model_dir, ids, [{"name": "streaming_llm", "ratio": ratio},
                                                  {"name": "knorm", "ratio": ratio},
                                                  {"name": "snapkv", "ratio": ratio,
                                                   "args": {"window_size": 16}}])
    streaming, knorm, snap = (g["layers"] for g in got)
    sinks_and_recent = list(range(4)) + list(range(N_CONTEXT - kept + 4, N_CONTEXT))
    assert all(head == sinks_and_recent for layer in streaming for head in layer)
    # Knorm keeps the keys of smallest norm: recomputed from tokenlean's own prefill keys
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    cache = model.new_cache(N_CONTEXT)
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache, last_n=1)
    for layer, heads in enumerate(knorm):
        keys = cache.layers[layer].view()[0][0]  # (H_kv, n, D), rotated as kvpress stores them
        want = (-keys.norm(dim=-1)).topk(kept, dim=-1).indices.sort(dim=-1).values
        assert heads == want.tolist()
    # SnapKV keeps its observation window (16 queries here) and half the context per head
    for layer in snap:
        for head in layer:
            assert len(head) == kept and set(range(N_CONTEXT - 16, N_CONTEXT)) <= set(head)


def test_missing_env_is_one_clear_line(tmp_path, monkeypatch, sample):
    monkeypatch.setenv(kvpress_peer.ENV_VAR, str(tmp_path / "nowhere" / "python"))
    assert kvpress_python() is None
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        run_kvpress_peer([sample], tmp_path, presses=["full"])
    msg = str(err.value)
    assert "\n" not in msg and setup_command() in msg and kvpress_peer.ENV_VAR in msg
    assert "torch==" in setup_command() and "kvpress==" in setup_command()


def test_worker_failure_reports_its_last_line(tmp_path, sample):
    fake = tmp_path / "python"  # a "python" that fails like a broken worker
    fake.write_text("#!/bin/sh\necho 'loading...' >&2\necho 'kvpress worker: OSError: "
                    "no weights in /x' >&2\necho 'trailing noise' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^the kvpress peer failed: OSError: no weights in /x$"):
        run_kvpress_peer([sample], tmp_path, presses=["full"], python=fake, progress=None)


@needs_kvpress
def test_real_worker_failure_is_one_line(tmp_path, sample):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    with pytest.raises(UserError) as err:
        run_kvpress_peer([sample], tmp_path, presses=["full"], progress=None)
    assert str(err.value).startswith("the kvpress peer failed: ") and "\n" not in str(err.value)


def test_budgets_must_be_fractions(tmp_path, sample):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="fractions kept"):
        run_kvpress_peer([sample], tmp_path, budgets=[512], python=os.devnull)
