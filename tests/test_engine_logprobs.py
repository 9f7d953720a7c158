"""Logprobs and penalties on the engine's sequences.

Logprobs are the model's own: they equal a full no-cache forward's log-softmax at each
position, whether the tokens came one per step, from an accepted draft tree, or in a batch.
Penalties follow OpenAI's rule, checked against a loop that recomputes everything.
"""

from __future__ import annotations

import pytest
import torch

from test_engine import prompts, run, work
from tokenlean.engine.scheduler import Scheduler, SchedulerConfig
from tokenlean.engine.sequence import Sequence, token_logprobs
from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams, penalize

TOP = 3


def full_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """(len(ids) - start, V) log-probabilities of ids[start:], one no-cache forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return logits[start - 1 : len(ids) - 1].float().log_softmax(-1)


def logprob_work(lm, prompt, n, drafter=None, method="greedy", sampling=None):
    w = work(lm, prompt, n, sampling=sampling, drafter=drafter, method=method)
    seq = w.seq
    w.seq = Sequence(lm.model, seq.prompt_ids, n, seq.sampling, drafter=drafter,
                     stop_ids=seq.stop_ids, method=method, logprobs=TOP)
    return w


@pytest.mark.parametrize("method", ["greedy", "pld", "recycling"])
def test_logprobs_equal_a_full_forward_in_a_batch(tiny_lm, method):
    drafter = tiny_lm.drafter(method) if method != "greedy" else None
    works = [logprob_work(tiny_lm, p, 16, drafter, method) for p in prompts(tiny_lm)[-6:]]
    run(Scheduler(tiny_lm.model, SchedulerConfig(prefix_cache_mb=0)), works)
    drafted = 0
    for w in works:
        result = w.sink.result
        assert len(result.logprobs) == len(result.token_ids) == result.completion_tokens
        ids = w.seq.prompt_ids + result.token_ids
        want = full_logprobs(tiny_lm.model, ids, len(w.seq.prompt_ids))
        for i, entry in enumerate(result.logprobs):
            assert entry.token == result.token_ids[i]
            assert entry.logprob == pytest.approx(want[i, entry.token].item(), abs=1e-4)
            assert [t for t, _ in entry.top] == want[i].topk(TOP).indices.tolist()
            assert entry.top[0][0] == entry.token  # greedy: the chosen token is the best
        # the streamed deltas carried the same entries, in order
        assert [e for d in w.sink.logprob_deltas for e in d] == result.logprobs
        drafted += result.stats.get("accepted_tokens", 0)
    if method != "greedy":
        assert drafted > 0  # some tokens came from verified trees, not one per step


def test_logprobs_of_tokens_cut_by_a_stop_string_are_dropped(tiny_lm):
    plain = tiny_lm.generate("def f(", 24, stop_token_ids=[])
    stop = plain.text[len(plain.text) // 2:][:3]
    w = logprob_work(tiny_lm, "def f(", 24)
    w.text.stops.__init__([stop])
    run(Scheduler(tiny_lm.model), [w])
    result = w.sink.result
    assert result.finish_reason == "stop"
    assert len(result.logprobs) == len(result.token_ids) < 24


def test_token_logprobs_without_alternatives():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = token_logprobs(logits, [2, 1], top=0)
    assert [e.top for e in out] == [[], []]
    assert out[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())


def reference_penalized(model, ids: list[int], n: int, sampling: SamplingParams) -> list[int]:
    """OpenAI's penalties by brute force: every step a full forward, counts recomputed."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))[0, -1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long),
                                minlength=logits.shape[-1]).float()
        out.append(int(penalize(logits, counts, sampling).argmax()))
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (2.0, 0.0), (-2.0, 0.7)])
def test_greedy_penalties_equal_the_brute_force_rule(tiny_lm, presence, frequency):
    sampling = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    ids = tiny_lm.encode("def f(")
    want = reference_penalized(tiny_lm.model, ids, 20, sampling)
    assert want != tiny_lm.generate(ids, 20, stop_token_ids=[]).token_ids  # they matter
    for method in ("greedy", "pld"):  # a drafter is set aside: penalties are not drafted
        drafter = tiny_lm.drafter(method) if method != "greedy" else None
        w = work(tiny_lm, ids, 20, sampling=sampling, drafter=drafter, method=method)
        w.seq.stop_ids = set()
        run(Scheduler(tiny_lm.model), [w])
        assert w.sink.result.token_ids == want
        assert w.seq.drafter is None


def test_penalty_range_is_checked():
    with pytest.raises(UserError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(UserError, match="frequency_penalty must be in"):
        SamplingParams(frequency_penalty=-3)
