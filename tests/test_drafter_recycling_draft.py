"""Token Recycling backing off to a draft model: the chain appears where the matrix has
nothing for the root (or always), is grafted without duplicating nodes, and adapts."""

from __future__ import annotations

import pytest
import torch

from tokenlean.errors import UserError
from tokenlean.spec_decode.registry import make_drafter
from tokenlean.spec_decode.verify import verify_greedy

HISTORY = [5, 9, 13, 21, 8, 30]


def session(lm, draft_dir, **options):
    d = make_drafter("recycling-draft", lm, {"model": str(draft_dir), "warm": "cold",
                                             "num_nodes": 7, **options}).session()
    d.start(list(HISTORY), None)
    return d


def draft_chain(model, history, n):
    """The draft's greedy continuation, by uncached forwards."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([history + out]))[0, -1].argmax()))
    return out


def target_logits(lm, history, tree):
    with torch.inference_mode():
        rows = [history] + [history + path(tree, i) for i in range(len(tree))]
        return torch.stack([lm.model(torch.tensor([r]))[0, -1] for r in rows])


def path(tree, node):
    out = []
    while node >= 0:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return out[::-1]


def test_an_empty_row_backs_off_to_the_draft_chain_then_recycling_takes_over(tiny_lm,
                                                                             tiny_model_dir):
    d = session(tiny_lm, tiny_model_dir)
    tree = d.propose(HISTORY, 8)  # a cold matrix: nothing for the root
    assert tree.tokens == draft_chain(tiny_lm.model, HISTORY, len(tree)) and len(tree) == 4
    assert d.info()["chain_steps"] == 1
    d.observe(tree, target_logits(tiny_lm, HISTORY, tree), verify_greedy(
        tree, target_logits(tiny_lm, HISTORY, tree)))
    again = d.propose(HISTORY, 8)  # the root's row is filled now: recycling alone
    assert len(again) > 0 and d.info()["chain_steps"] == 1
    assert again.tokens[0] == int(target_logits(tiny_lm, HISTORY, tree)[0].argmax())


def test_always_grafts_the_chain_onto_the_recycling_tree(tiny_lm, tiny_model_dir):
    d = session(tiny_lm, tiny_model_dir, when="always")
    first = d.propose(HISTORY, 8)
    logits = target_logits(tiny_lm, HISTORY, first)
    d.observe(first, logits, verify_greedy(first, logits))
    tree = d.propose(HISTORY, 8)
    chain = draft_chain(tiny_lm.model, HISTORY, 4 if len(first) == 4 else len(first))
    paths = {tuple(path(tree, i)) for i in range(len(tree))}
    assert all(tuple(chain[: j + 1]) in paths for j in range(len(d.chain)))  # the chain is in
    siblings = {(p, t) for p, t in zip(tree.parents, tree.tokens)}
    assert len(siblings) == len(tree)  # grafted where they agree: no duplicate siblings
    assert len(tree) > len(d.chain) and d.info()["chain_steps"] == 2


def test_the_chain_grows_when_fully_accepted(tiny_lm, tiny_model_dir):
    """The draft is the target's own weights: its chain is always accepted in full."""
    d = session(tiny_lm, tiny_model_dir, when="always", draft_tokens=2, max_draft_tokens=8)
    history = list(HISTORY)
    lengths = []
    for _ in range(3):
        tree = d.propose(history, 16)
        logits = target_logits(tiny_lm, history, tree)
        accepted = verify_greedy(tree, logits)
        d.observe(tree, logits, accepted)
        lengths.append(len(d.chain))
        history += accepted.tokens
    assert lengths == [2, 4, 6]


@pytest.mark.parametrize(("options", "message"), [({"when": "never"}, "when must be"),
                                                  ({"draft_tokens": 0}, "num_draft_tokens")])
def test_bad_options(tiny_lm, tiny_model_dir, options, message):
    with pytest.raises(UserError, match=message):
        make_drafter("recycling-draft", tiny_lm, {"model": str(tiny_model_dir), **options})
