"""Sampling invariants: what `probabilities` keeps, and that `sample` follows it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams, probabilities, sample

V = 32


def random_logits(seed: int, shape=(V,), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


seeds = st.integers(0, 2**31 - 1)


# --- shape of the distribution ------------------------------------------------------------


@given(seeds)
@settings(max_examples=30, deadline=None)
def test_greedy_is_one_hot_argmax(seed):
    logits = random_logits(seed, (3, V))
    p = probabilities(logits, SamplingParams(temperature=0.0))
    assert p.dtype == torch.float32
    assert torch.equal(p.argmax(-1), logits.argmax(-1))
    assert torch.equal(p.sum(-1), torch.ones(3))
    assert torch.equal((p > 0).sum(-1), torch.ones(3, dtype=torch.long))


@given(seeds, st.floats(0.05, 5.0), st.integers(0, V + 5), st.floats(0.01, 1.0))
@settings(max_examples=40, deadline=None)
def test_rows_sum_to_one(seed, temperature, top_k, top_p):
    logits = random_logits(seed, (4, V))
    p = probabilities(logits, SamplingParams(temperature, top_k, top_p))
    assert p.shape == logits.shape and p.dtype == torch.float32
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    # the most likely token always survives every filter
    assert (p.gather(-1, logits.argmax(-1, keepdim=True)) > 0).all()


@given(seeds, st.floats(0.05, 5.0))
@settings(max_examples=30, deadline=None)
def test_temperature_is_softmax_of_scaled_logits(seed, temperature):
    logits = random_logits(seed, (2, V))
    p = probabilities(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(p, (logits.double() / temperature).softmax(-1).float(),
                               rtol=1e-5, atol=1e-6)


def test_half_precision_logits_give_float32_probabilities():
    logits = random_logits(0).to(torch.bfloat16)
    p = probabilities(logits, SamplingParams(temperature=0.7))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, (logits.float() / 0.7).softmax(-1))


@given(seeds, st.integers(1, V), st.floats(0.1, 3.0))
@settings(max_examples=40, deadline=None)
def test_top_k_keeps_exactly_the_k_largest(seed, k, temperature):
    logits = random_logits(seed)  # continuous random values: no ties
    p = probabilities(logits, SamplingParams(temperature=temperature, top_k=k))
    top = logits.topk(k).indices
    # nothing outside the k largest; inside, the renormalised softmax over them (a kept token
    # may still underflow to 0 in float32 at a low temperature: the float64 reference is ~0 too)
    assert set(torch.nonzero(p).flatten().tolist()) <= set(top.tolist())
    expected = torch.zeros(V, dtype=torch.float64)
    expected[top] = (logits[top].double() / temperature).softmax(-1)
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)


def test_top_k_zero_or_larger_than_vocab_keeps_everything():
    logits = random_logits(1)
    for k in (0, V, V + 10):
        p = probabilities(logits, SamplingParams(temperature=1.0, top_k=k))
        assert (p > 0).all()


@given(seeds, st.floats(0.01, 1.0, exclude_max=True), st.floats(0.2, 3.0))
@settings(max_examples=60, deadline=None)
def test_top_p_keeps_smallest_prefix_reaching_mass(seed, top_p, temperature):
    logits = random_logits(seed)
    full = (logits.double() / temperature).softmax(-1)
    sorted_p, order = full.sort(descending=True)
    cum = sorted_p.cumsum(0)
    # the reference: the smallest n whose top-n mass reaches top_p
    n = int((cum < top_p).sum()) + 1
    # stay clear of float32 rounding right at a boundary
    assume(all(abs(float(c) - top_p) > 1e-5 for c in cum[max(n - 2, 0) : n + 1]))
    p = probabilities(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert set(torch.nonzero(p).flatten().tolist()) == set(order[:n].tolist())
    assert p[order[0]] > 0  # the top token always stays
    kept = order[:n]
    torch.testing.assert_close(p[kept].double(), sorted_p[:n] / sorted_p[:n].sum(),
                               rtol=1e-4, atol=1e-6)


def test_top_p_tiny_keeps_only_the_top_token():
    logits = random_logits(2)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert torch.equal(p, torch.zeros(V).scatter_(0, logits.argmax().view(1), 1.0))


def test_top_k_then_top_p_compose():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.9))
    after_k = logits[:4].softmax(-1)  # 0.644, 0.237, 0.087, 0.032: 0.9 is reached at the 3rd
    assert (p[:3] > 0).all() and (p[3:] == 0).all()
    torch.testing.assert_close(p[:3], after_k[:3] / after_k[:3].sum())


# --- parameter checks ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0},
    {"temperature": -1e-9},
    {"temperature": 101.0},
    {"temperature": math.nan},
    {"temperature": math.inf},
    {"top_k": -1},
    {"top_p": 0.0},
    {"top_p": -0.5},
    {"top_p": 1.5},
    {"top_p": math.nan},
    {"seed": -1},
    {"seed": 2**64},
])
def test_invalid_params_raise_user_error(kwargs):
    with pytest.raises(UserError):
        SamplingParams(**kwargs)


def test_valid_edge_params():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=100.0).greedy
    SamplingParams(top_p=1.0, top_k=0)
    SamplingParams(temperature=1.0, seed=2**64 - 1).generator("cpu")


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 5e-324])
def test_tiny_temperature_tends_to_the_argmax(temperature):
    """Dividing unshifted logits by 1e-40 overflowed to inf and gave nan probabilities."""
    logits = random_logits(3)
    p = probabilities(logits, SamplingParams(temperature=temperature))
    assert torch.equal(p, torch.zeros(V).scatter_(0, logits.argmax().view(1), 1.0))
    assert sample(p, SamplingParams(temperature=temperature, seed=0).generator("cpu")) == logits.argmax()


# --- drawing -------------------------------------------------------------------------------


def test_sample_shape():
    probs = probabilities(random_logits(3, (2, 3, V)), SamplingParams(temperature=1.0))
    tokens = sample(probs, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 3)
    assert ((tokens >= 0) & (tokens < V)).all()


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, seed=1234)
    probs = probabilities(random_logits(4, (64, V), scale=1.0), params)
    a = sample(probs, params.generator("cpu"))
    b = sample(probs, params.generator("cpu"))
    assert torch.equal(a, b)
    c = sample(probs, SamplingParams(temperature=1.0, seed=4321).generator("cpu"))
    assert not torch.equal(a, c)  # 64 draws over a flat-ish 32-way distribution


def test_unseeded_generators_differ():
    params = SamplingParams(temperature=1.0)
    probs = probabilities(random_logits(5, (64, V), scale=1.0), params)
    assert not torch.equal(sample(probs, params.generator("cpu")),
                           sample(probs, params.generator("cpu")))


def test_samples_never_leave_the_kept_set():
    params = SamplingParams(temperature=1.5, top_k=5, top_p=0.8)
    probs = probabilities(random_logits(6, scale=1.0), params)
    draws = sample(probs.expand(5000, V), torch.Generator().manual_seed(0))
    assert (probs[draws] > 0).all()


def test_sample_frequencies_follow_probabilities():
    """20000 seeded draws from a 5-token distribution: every token's frequency within 4.5
    standard errors of its probability (a correct sampler misses that with probability
    ~1e-5 per token; a shift of 2 points on the likeliest token is caught). The seed is
    fixed, so the test is deterministic."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=0.8, seed=0)
    p = probabilities(logits, params)
    n = 20_000
    draws = sample(p.expand(n, 5), params.generator("cpu"))
    freq = torch.bincount(draws, minlength=5).double() / n
    p = p.double()
    assert ((freq - p).abs() < 4.5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
