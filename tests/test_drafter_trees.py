"""RSD, DySpec and SpecTr: the draft runner's tree logits, the trees each builds (recomputed
here without a cache), sampling without replacement, K-SEQ's sequences, and their options. Exactness and the
sampling distribution run in the registry loops (test_spec.py, test_verify.py, test_engine.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams
from tokenlean.spec_decode.draft_runner import DraftRunner
from tokenlean.spec_decode.drafters import dyspec as dyspec_module
from tokenlean.spec_decode.drafters.rsd import truncated_gumbel, without_replacement
from tokenlean.spec_decode.registry import make_drafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import verify_greedy

HISTORY = [5, 9, 13, 21, 8, 30]


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm


def drafter(lm, tiny_model_dir, method, sampling=None, **options):
    """A session of `method` whose draft model is the target's own weights."""
    d = make_drafter(method, lm, {"model": str(tiny_model_dir), **options}).session()
    d.start(HISTORY, sampling or SamplingParams())
    return d


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits after ids, with no cache (the reference)."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


def path(tree: DraftTree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return out[::-1]


def test_runner_tree_logits_equal_uncached_forwards(lm):
    model = lm.model
    runner = DraftRunner(model, 8)
    root = runner.catch_up(HISTORY)
    assert torch.allclose(root, plain_logits(model, HISTORY), atol=1e-4)
    # fed in two rounds: the second round's nodes must see only their own ancestors
    tree = DraftTree([3, 4, 7], [-1, -1, 0])
    first = runner.extend(tree)
    tree = DraftTree([3, 4, 7, 11, 12], [-1, -1, 0, 1, 2])
    second = runner.extend(tree)
    rows = torch.cat((first, second))
    for node in range(len(tree)):
        assert torch.allclose(rows[node], plain_logits(model, HISTORY + path(tree, node)),
                              atol=1e-4), node
    runner.rewind()  # the tree leaves the cache: a longer history reuses the prefix
    again = runner.catch_up(HISTORY + [3])
    assert torch.allclose(again, plain_logits(model, HISTORY + [3]), atol=1e-4)


def test_rsd_c_greedy_tree_is_the_drafts_top_k_per_level(lm, tiny_model_dir):
    d = drafter(lm, tiny_model_dir, "rsd", branches="3,2,1")
    tree = d.propose(HISTORY, 8)
    assert len(tree) == 3 + 6 + 6 and tree.q is None
    for parent in [-1, *range(len(tree))]:
        kids = tree.children[parent + 1]
        if not kids:
            assert tree.depths[parent] == 3
            continue
        context = HISTORY + (path(tree, parent) if parent >= 0 else [])
        want = plain_logits(lm.model, context).topk(len(kids)).indices.tolist()
        assert [tree.tokens[k] for k in kids] == want
    assert len(d.propose(HISTORY, 1)) == 3  # max_depth cuts levels


def beam_search(model, history, beam: int, depth: int) -> list[tuple[list[int], float]]:
    """Plain deterministic beam search by draft log-probability, every level's kept paths."""
    beams, levels = [([], 0.0)], []
    for _ in range(depth):
        cands = []
        for seq, score in beams:
            lq = torch.log_softmax(plain_logits(model, history + seq).double(), -1)
            top = lq.topk(beam)
            cands += [(seq + [int(t)], score + float(s)) for s, t in zip(top.values, top.indices)]
        beams = sorted(cands, key=lambda c: -c[1])[:beam]
        levels.append(beams)
    return levels


def test_rsd_s_greedy_tree_is_beam_search(lm, tiny_model_dir):
    d = drafter(lm, tiny_model_dir, "rsd", mode="s", beam=3, depth=3)
    tree = d.propose(HISTORY, 8)
    assert len(tree) == 9
    got = {tuple(path(tree, n)) for n in range(len(tree))}
    want = {tuple(seq) for level in beam_search(lm.model, HISTORY, 3, 3) for seq, _ in level}
    assert got == want


@pytest.mark.parametrize("options", [{"branches": "4,3"}, {"mode": "s", "beam": 4, "depth": 2}])
def test_sampled_siblings_are_without_replacement_with_their_q(lm, tiny_model_dir, options):
    d = drafter(lm, tiny_model_dir, "rsd", SamplingParams(1.0, seed=4), **options)
    tree = d.propose(HISTORY, 8)
    assert tree.q is not None and tree.q.shape == (len(tree), lm.model.config.vocab_size)
    for parent in [-1, *range(len(tree))]:
        kids = tree.children[parent + 1]
        tokens = [tree.tokens[k] for k in kids]
        assert len(set(tokens)) == len(tokens)  # without replacement
        for j, k in enumerate(kids):
            row = tree.q[k]
            assert abs(float(row.sum()) - 1) < 1e-4
            assert all(float(row[t]) == 0 for t in tokens[:j])  # the earlier draws taken out
            assert float(row[tokens[j]]) > 0
        if kids:  # the first child's q is the draft's distribution after its path
            context = HISTORY + (path(tree, parent) if parent >= 0 else [])
            q = torch.softmax(plain_logits(lm.model, context), -1)
            assert torch.allclose(tree.q[kids[0]], q, atol=1e-4)


def test_truncated_gumbel_keeps_order_and_tops_out_at_the_bound():
    g = torch.tensor([0.3, 2.5, -1.0, float("-inf"), 1.7], dtype=torch.float64)
    t = truncated_gumbel(g, -0.4)
    assert float(t.max()) == pytest.approx(-0.4)
    finite = [0, 1, 2, 4]
    assert sorted(finite, key=lambda i: -g[i]) == sorted(finite, key=lambda i: -t[i])
    assert t[3] == float("-inf") and (t <= -0.4 + 1e-12).all()


def test_without_replacement_rows():
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    rows = without_replacement(q, [1, 0])
    assert torch.allclose(rows[0], q)
    assert torch.allclose(rows[1], torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7], dtype=torch.float64))


def best_paths(model, history, n: int, siblings: int, depth: int) -> set[tuple[int, ...]]:
    """The n paths of highest draft probability (each node's `siblings` likeliest tokens,
    up to `depth` deep), by exhaustive enumeration."""
    scored, stack = [], [((), 1.0)]
    while stack:
        seq, prob = stack.pop()
        if len(seq) == depth:
            continue
        q = torch.softmax(plain_logits(model, history + list(seq)).double(), -1)
        top = q.topk(siblings)
        for p, t in zip(top.values.tolist(), top.indices.tolist()):
            scored.append((seq + (t,), prob * p))
            stack.append((seq + (t,), prob * p))
    scored.sort(key=lambda s: -s[1])
    return {seq for seq, _ in scored[:n]}


def test_dyspec_greedy_tree_holds_the_most_probable_paths(lm, tiny_model_dir):
    d = drafter(lm, tiny_model_dir, "dyspec", num_nodes=10, per_round=1, siblings=3)
    tree = d.propose(HISTORY, 3)
    assert len(tree) == 10 and max(tree.depths) <= 3
    got = {tuple(path(tree, n)) for n in range(len(tree))}
    assert got == best_paths(lm.model, HISTORY, 10, 3, 3)
    assert d.info()["tree_budget"] == 10


def test_dyspec_budget_comes_from_the_cost_curve_and_the_last_values(lm, tiny_model_dir,
                                                                    monkeypatch):
    d = drafter(lm, tiny_model_dir, "dyspec", max_nodes=31)
    flat = {1: 1.0, 4: 1.0, 8: 1.0, 16: 1.0, 32: 1.0}  # scoring more costs nothing more
    steep = {1: 1.0, 4: 2.0, 8: 4.0, 16: 8.0, 32: 16.0}  # every token costs a forward
    d.values = [0.9] * 40
    monkeypatch.setattr(dyspec_module, "forward_costs", lambda model: flat)
    assert d._budget() == 31  # free tokens: the largest tree
    monkeypatch.setattr(dyspec_module, "forward_costs", lambda model: steep)
    assert d._budget() == 3  # 1 + 0.9n over ~n/2 forwards: the smallest
    d.values = [0.9, 0.9, 0.9] + [0.0] * 40
    monkeypatch.setattr(dyspec_module, "forward_costs", lambda model: flat)
    assert d._budget() == 3  # nothing to gain past the nodes worth drafting: ties go small
    assert len(d.propose(HISTORY, 8)) <= 3


def test_dyspec_sampled_siblings_follow_the_draw_order(lm, tiny_model_dir):
    d = drafter(lm, tiny_model_dir, "dyspec", SamplingParams(1.0, seed=1), num_nodes=12)
    tree = d.propose(HISTORY, 4)
    assert len(tree) == 12 and tree.q is not None
    for parent in [-1, *range(len(tree))]:
        kids = tree.children[parent + 1]
        tokens = [tree.tokens[k] for k in kids]
        assert len(set(tokens)) == len(tokens)
        for j, k in enumerate(kids):
            assert all(float(tree.q[k][t]) == 0 for t in tokens[:j])


@pytest.mark.parametrize(("method", "options", "message"), [
    ("rsd", {"mode": "x"}, "mode must be c or s"),
    ("rsd", {"branches": "2,a"}, "comma-separated"),
    ("rsd", {"branches": "0,2"}, "each >= 1"),
    ("rsd", {"branches": "8,8,8"}, "more than 256 nodes"),
    ("rsd", {"beam": 0}, "beam"),
    ("dyspec", {"max_nodes": 100}, "max_nodes"),
    ("dyspec", {"num_nodes": 40}, "num_nodes"),
])
def test_bad_options_are_one_line_errors(lm, tiny_model_dir, method, options, message):
    with pytest.raises(UserError, match=message):
        make_drafter(method, lm, {"model": str(tiny_model_dir), **options})


def test_max_nodes_bounds_every_tree(lm, tiny_model_dir):
    rsd = drafter(lm, tiny_model_dir, "rsd", branches="3,2,2")
    assert rsd.max_nodes == 3 + 6 + 12 == len(rsd.propose(HISTORY, 8))
    s = drafter(lm, tiny_model_dir, "rsd", mode="s", beam=2, depth=5)
    assert s.max_nodes == 10 and len(s.propose(HISTORY, 8)) <= 10
    assert math.isfinite(float(truncated_gumbel(torch.zeros(3, dtype=torch.float64), 0.0)[0]))


def test_spectr_tree_is_k_sequences_level_by_level(lm, tiny_model_dir):
    d = drafter(lm, tiny_model_dir, "spectr", SamplingParams(1.0, seed=2), num_seqs=3, length=3)
    tree = d.propose(HISTORY, 8)
    assert tree.kseq and len(tree) == 9 and tree.q is not None
    assert tree.parents == [-1, -1, -1, 0, 1, 2, 3, 4, 5]
    for node in range(len(tree)):  # each draw's q is the draft's after its own path
        context = HISTORY + path(tree, node)[:-1]
        q = torch.softmax(plain_logits(lm.model, context), -1)
        assert torch.allclose(tree.q[node], q, atol=1e-4), node
    cut = tree.first(4)  # a cut keeps whole levels' positions, never looks at the tokens
    assert cut.kseq and cut.parents == [-1, -1, -1, 0]


def test_greedy_follows_every_duplicate_path():
    """Two sequences start with the same token; only the second goes on as the target
    does. Greedy verification must find it (it used to stop after the first)."""
    tree = DraftTree([7, 7, 3, 4, 9], [-1, -1, 0, 1, 3], kseq=True)
    logits = torch.full((6, 16), -5.0)
    logits[0, 7] = 0  # root: 7
    logits[1, 4] = logits[2, 4] = 0  # after 7 (nodes 0 and 1, the same path): 4, not 3
    logits[4, 9] = 0  # after node 3 (7, 4): 9
    logits[5, 2] = 0  # after node 4: bonus 2
    acc = verify_greedy(tree, logits)
    assert acc.tokens == [7, 4, 9, 2] and acc.nodes == [1, 3, 4]
