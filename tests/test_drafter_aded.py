"""ADED: the tri-gram table learns what the target predicted, backs off to the bigram,
explores, carries over between requests, and stays lossless and fast."""

from __future__ import annotations

import random
import time

import pytest
import torch

from tokenlean.errors import UserError
from tokenlean.spec_decode.drafters.aded import ADED, ADEDParams
from tokenlean.spec_decode.registry import make_drafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import Accepted, verify_greedy

V = 16


def rows(*dists: dict[int, float]) -> torch.Tensor:
    """Logits whose softmax puts (about) these probabilities on these tokens, row by row."""
    out = torch.full((len(dists), V), -30.0)
    for r, dist in enumerate(dists):
        for token, p in dist.items():
            out[r, token] = torch.log(torch.tensor(p))
    return out


def drafter(**kw) -> ADED:
    d = ADED(None, ADEDParams(**kw)).session()
    d.start([5, 6], None)
    return d


def test_trigram_learns_what_the_target_predicted():
    d = drafter()
    tree = d.propose([5, 6], 4)
    assert len(tree) == 0  # nothing learned yet
    d.observe(tree, rows({9: 0.9, 2: 0.1}), Accepted([], [9]))
    assert d.tables.tri[(5, 6)].next.keys() >= {9, 2}
    tree = d.propose([5, 6], 4)
    assert tree.tokens[0] == 9  # the target's favourite first
    # row 0 follows (5, 6), row i + 1 follows (node i's parent token, node i's token)
    logits = torch.full((len(tree) + 1, V), -30.0)
    logits[0, 9] = 0.0
    for i, token in enumerate(tree.tokens):
        logits[i + 1, 3 if token == 9 else 1] = 0.0
    d.observe(tree, logits, verify_greedy(tree, logits))
    best = max(d.tables.tri[(6, 9)].next.items(), key=lambda e: e[1][0])[0]
    assert best == 3
    tree = d.propose([5, 6], 4)
    assert tree.tokens[:2] == [9, 3] and tree.parents[:2] == [-1, 0]


def test_bigram_back_off_and_trigram_precedence():
    d = drafter()
    d.propose([5, 6], 2)
    d.observe(DraftTree(), rows({9: 1.0}), Accepted([], [9]))  # (5, 6) -> 9
    assert (7, 6) not in d.tables.tri
    assert d.propose([7, 6], 2).tokens[0] == 9  # no (7, 6): the bigram of 6 answers
    d.observe(DraftTree(), rows({4: 1.0}), Accepted([], [4]))  # (7, 6) -> 4
    assert d.propose([7, 6], 2).tokens[0] == 4
    assert d.propose([5, 6], 2).tokens[0] == 9  # the tri-gram wins over the mixed bigram


@pytest.mark.parametrize("explore", [0.0, 1.0])
def test_exploration_proposes_a_never_tried_candidate(explore):
    d = drafter(num_nodes=1, max_depth=1, explore=explore)
    seen = []
    for _ in range(30):
        tree = d.propose([5, 6], 1)
        seen += tree.tokens
        d.observe(tree, rows({9: 0.9, 2: 0.1}), Accepted([], [9]))
    assert seen[0] == 9  # the first step drafts nothing, then the favourite
    assert (2 in seen) == (explore > 0)  # only the bonus ever tries the runner-up


def test_propose_and_observe_are_fast():
    d = drafter()
    rng = random.Random(0)
    history = [rng.randrange(50) for _ in range(64)]
    torch.manual_seed(0)
    spent, steps = 0.0, 200
    for _ in range(steps):
        t0 = time.perf_counter()
        tree = d.propose(history, 8)
        logits = torch.randn(len(tree) + 1, 64)
        t1 = time.perf_counter()
        accepted = verify_greedy(tree, logits)
        t2 = time.perf_counter()
        d.observe(tree, logits, accepted)
        spent += time.perf_counter() - t2 + t1 - t0
        history += accepted.tokens
    assert len(d.tables.tri) > 50
    assert spent / steps < 2e-3, spent / steps  # loose: ~0.3 ms here; well under a forward


@pytest.fixture(scope="module")
def code_lm():
    from tokenlean.zoo import zoo_path

    if zoo_path("tl-code") is None:
        pytest.skip("the embedded model tl-code is not installed")
    from tokenlean.lm import load

    return load("tl-code", device="cpu")


def test_lossless_on_tl_code_and_learning_carries_over(code_lm):
    from tokenlean.lm import LM

    lm = LM(code_lm.name, code_lm.folder, code_lm.model, code_lm.tokenizer)  # fresh drafters
    prompt = "def fib(n):\n    if n < 2:\n        return n\n    return"
    plain = lm.generate(prompt, 32, stop_token_ids=[]).token_ids
    first = lm.generate(prompt, 32, method="aded", stop_token_ids=[])
    second = lm.generate(prompt, 32, method="aded", stop_token_ids=[])
    assert first.token_ids == plain and second.token_ids == plain
    assert second.stats["mean_accepted_tokens"] > first.stats["mean_accepted_tokens"]
    assert lm.drafter("aded").tables.tri  # shared by both requests' sessions


@pytest.mark.parametrize("option", ["num_nodes=0", "max_depth=0", "top_k=0", "top_k=99",
                                    "decay=0", "decay=1.5", "explore=-1", "opt=bad",
                                    "num_nodes=many"])
def test_bad_options_are_user_errors(code_lm, option):
    with pytest.raises(UserError, match="aded"):
        make_drafter("aded", code_lm, [option])


def test_tables_stay_bounded(monkeypatch):
    from tokenlean.spec_decode.drafters import aded

    monkeypatch.setattr(aded, "MAX_CONTEXTS", 5)
    tables = aded.Tables(aded.ADEDParams())
    for i in range(20):
        tables.add(i, i + 1, [i + 2], [1.0])
    assert len(tables.tri) == 5 and len(tables.bi) == 5
    assert (19, 20) in tables.tri and (0, 1) not in tables.tri  # the oldest went first
