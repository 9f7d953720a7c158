"""Sampling is lossless: speculative outputs are distributed exactly as plain sampling's.

Every test compares an empirical distribution (fixed seeds) with one enumerated exactly, by
total variation distance, against the bound `tv_bound`:

- E[TV] <= 1/2 * sum_s sqrt(P(s)(1 - P(s)) / N): each empirical frequency is a mean of N
  i.i.d. [0, 1] variables with mean P(s) and variance <= P(s)(1 - P(s)) (Jensen: E|X - EX| <=
  sd). For K equally likely outcomes this is the familiar 1/2 * sqrt(K / N).
- TV moves by at most 1/N when one of the N samples changes, so by McDiarmid
  P(TV >= E[TV] + t) <= exp(-2 N t^2); t = sqrt(ln(1/delta) / (2N)) with delta = 1e-3.

So a correct sampler fails a test with probability below 0.1% per seed choice (the seeds are
fixed, so a run is deterministic; a torch upgrade that changes the random streams is a fresh
draw). The bounds actually used are printed on failure and asserted small enough to catch the
classic bugs; `test_wrong_q_is_caught` shows a real one (q not the distribution the draft was
sampled from) exceeding its bound several times over.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from tokenlean.lm import LM
from tokenlean.model.tokenizer import IncrementalDetokenizer
from tokenlean.sampling import SamplingParams, probabilities
from tokenlean.spec_decode.registry import DRAFTERS
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import verify_sampling

DELTA = 1e-3


def tv_bound(exact, n: int, delta: float = DELTA) -> float:
    """A TV distance a correct sampler exceeds with probability < delta (see the docstring)."""
    p = np.asarray(list(exact.values()) if isinstance(exact, dict) else exact, dtype=np.float64)
    return 0.5 * np.sqrt(p * (1 - p) / n).sum() + math.sqrt(math.log(1 / delta) / (2 * n))


def tv(exact: dict, empirical: dict) -> float:
    keys = set(exact) | set(empirical)
    return 0.5 * sum(abs(exact.get(k, 0.0) - empirical.get(k, 0.0)) for k in keys)


T1 = SamplingParams(temperature=1.0)
SHAPED = SamplingParams(temperature=0.7, top_k=3, top_p=0.9)
PARAMS = [pytest.param(T1, id="t1"), pytest.param(SHAPED, id="t0.7-k3-p0.9")]


# --- unit level: verify_sampling against exact enumeration ------------------------------------


def table(vocab: int, depth: int, seed: int, params: SamplingParams):
    """Random logits for every token path up to `depth` long, and p = probabilities(logits).
    Their spread grows with the temperature, so every case keeps several likely tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = {path: torch.randn(vocab, generator=g) * 1.5 * params.temperature
              for n in range(depth + 1) for path in itertools.product(range(vocab), repeat=n)}
    return logits, {path: probabilities(x, params).double() for path, x in logits.items()}


def node_paths(tree: DraftTree) -> list[tuple]:
    """The token path from the root to each node (inclusive)."""
    paths: list[tuple] = []
    for token, parent in zip(tree.tokens, tree.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    return paths


def tree_logits(tree: DraftTree, logits: dict) -> torch.Tensor:
    """(N+1, V) the target's logits at [root, *nodes], as the decode loop hands them over."""
    return torch.stack([logits[()], *(logits[p] for p in node_paths(tree))])


def check_accepted(tree: DraftTree, accepted) -> None:
    """Accepted nodes form a root path, and the tokens are theirs plus one bonus."""
    parent = -1
    for node in accepted.nodes:
        assert tree.parents[node] == parent
        parent = node
    assert accepted.tokens[:-1] == [tree.tokens[n] for n in accepted.nodes]
    assert len(accepted.tokens) == len(accepted.nodes) + 1


def ideal_walk(tree: DraftTree, p: dict) -> dict:
    """Plain sampling, walked along a fixed tree: draw x ~ p(node); if a child holds x move
    there, else stop with bonus x. The exact distribution of output sequences."""
    out: dict[tuple, float] = {}

    def walk(node: int, path: tuple, prob: float) -> None:
        kids: dict[int, int] = {}
        for child in tree.children[node + 1]:
            kids.setdefault(tree.tokens[child], child)  # a duplicate sibling is never reached
        for x, px in enumerate(p[path].tolist()):
            if px == 0:
                continue
            if x in kids:
                walk(kids[x], path + (x,), prob * px)
            else:
                out[path + (x,)] = out.get(path + (x,), 0.0) + prob * px

    walk(-1, (), 1.0)
    return out


def frequencies(counts: Counter, n: int) -> dict:
    return {k: c / n for k, c in counts.items()}


@pytest.mark.parametrize("params", PARAMS)
def test_one_hot_rule_is_lossless(params):
    """Deterministic drafts (q None): fixed tree with a duplicated sibling token."""
    V, N = 6, 20000
    logits, p = table(V, 2, seed=1, params=params)
    rank = {path: x.argsort(descending=True).tolist() for path, x in p.items()}
    # root -> [its 2nd likeliest token a, its likeliest, a again (a duplicate sibling)],
    # a -> [the likeliest token after a, the 3rd likeliest (outside top-k/top-p when shaped)]
    a = rank[()][1]
    tree = DraftTree([a, rank[()][0], a, rank[(a,)][0], rank[(a,)][2]], [-1, -1, -1, 0, 0])
    rows = tree_logits(tree, logits)
    exact = ideal_walk(tree, p)
    assert abs(sum(exact.values()) - 1) < 1e-6
    g = torch.Generator().manual_seed(0)
    counts, outcomes = Counter(), {}
    for _ in range(N):
        acc = verify_sampling(tree, rows, params, g)
        counts[tuple(acc.tokens)] += 1
        outcomes[(tuple(acc.nodes), tuple(acc.tokens))] = acc
    for acc in outcomes.values():
        check_accepted(tree, acc)
        assert 2 not in acc.nodes  # the duplicate of a token already rejected is rejected
    assert {len(acc.nodes) for acc in outcomes.values()} == {0, 1, 2}  # not vacuous
    dist, bound = tv(exact, frequencies(counts, N)), tv_bound(exact, N)
    print(f"one-hot {params}: K={len(exact)} TV {dist:.4f} bound {bound:.4f}")
    assert bound < 0.03
    assert dist < bound, f"TV {dist:.4f} >= bound {bound:.4f}"


def draft_tables(vocab: int, depth: int, seed: int, params: SamplingParams):
    """A draft distribution q for every parent path, shaped like p, with CDFs to draw from."""
    _, q = table(vocab, depth, seed, params)
    return q, {path: cdf_of(x) for path, x in q.items()}


def cdf_of(x: torch.Tensor) -> list[float]:
    c = np.cumsum(x.numpy()) / float(x.sum())
    c[np.flatnonzero(x.numpy())[-1] :] = 1.0  # rounding can never pick a q = 0 token
    return c.tolist()


def draw(cdf: list[float], rng: random.Random) -> int:
    return bisect.bisect_right(cdf, rng.random())


def extend(dist: dict, p: dict, length: int) -> dict:
    """Spread each sequence shorter than `length` over its plain-sampling continuations."""
    out: dict[tuple, float] = {}
    stack = list(dist.items())
    while stack:
        seq, prob = stack.pop()
        if len(seq) == length:
            out[seq] = out.get(seq, 0.0) + prob
            continue
        for x, px in enumerate(p[seq].tolist()):
            if px > 0:
                stack.append((seq + (x,), prob * px))
    return out


def run_random_trees(parents: list[int], params: SamplingParams, trials: int, seed: int,
                     wrong_q: bool = False, without_replacement: bool = False, V: int = 4):
    """Siblings drawn i.i.d. from q(parent path) every trial (SpecInfer; a chain is plain
    speculative sampling), or without replacement (RSD: each sibling from q with the earlier
    siblings' tokens taken out, renormalised); tree.q holds the distribution each node was
    drawn from. Returns the exact plain distribution of the first depth+1 tokens and the
    verifier's, each output extended by plain sampling to that length (lossless <=> the two
    agree)."""
    # V^(depth+1) outcomes: 4^3 = 64 keeps the bound near 0.03 with 20000 trials
    depth = max(DraftTree([0] * len(parents), parents).depths)
    logits, p = table(V, depth + 1, seed=seed, params=params)
    q, cdf = draft_tables(V, depth, seed=seed + 100, params=params)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    uniform = torch.full((V,), 1.0 / V, dtype=torch.float64)
    counts, depths = Counter(), Counter()
    for _ in range(trials):
        tokens, paths, qrows = [], [], []
        for parent in parents:
            parent_path = paths[parent] if parent >= 0 else ()
            row, cum = q[parent_path], cdf[parent_path]
            if without_replacement:
                taken = [t for t, par in zip(tokens, parents) if par == parent]
                row = row.clone()
                row[taken] = 0.0
                if row.sum() <= 0:  # q's support used up: any distribution will do, if told
                    row = torch.ones(V, dtype=torch.float64)
                    row[taken] = 0.0
                row, cum = row / row.sum(), cdf_of(row)
            tokens.append(draw(cum, rng))
            paths.append(parent_path + (tokens[-1],))
            qrows.append(uniform if wrong_q else row)
        tree = DraftTree(tokens, list(parents), torch.stack(qrows).float())
        acc = verify_sampling(tree, tree_logits(tree, logits), params, g)
        check_accepted(tree, acc)
        counts[tuple(acc.tokens)] += 1
        depths[len(acc.nodes)] += 1
    # not vacuous: every depth, from "all rejected" to "a full path accepted", happened often
    # (without replacement, siblings that cover q's support leave nothing to reject into)
    assert all(depths[d] > trials // 100 for d in range(without_replacement, depth + 1)), depths
    length = depth + 1
    exact = extend({(): 1.0}, p, length)
    return exact, extend(frequencies(counts, trials), p, length)


TREES = {
    # root -> 3 i.i.d. siblings; the first of them -> 2 i.i.d. siblings
    "specinfer-tree": ([-1, -1, -1, 0, 0], False, 4),
    "chain": ([-1, 0], False, 4),
    # the same shape with siblings drawn without replacement (RSD)
    "rsd-tree": ([-1, -1, -1, 0, 0], True, 4),
    # 4 deep, over 3 tokens (3^5 outcomes): every depth's residual is used
    "chain-4": ([-1, 0, 1, 2], False, 3),
}


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("shape", TREES)
def test_rejection_sampling_is_lossless(shape, params):
    parents, without_replacement, vocab = TREES[shape]
    N = 20000
    exact, empirical = run_random_trees(parents, params, N, seed=2,
                                        without_replacement=without_replacement, V=vocab)
    assert abs(sum(exact.values()) - 1) < 1e-6 and abs(sum(empirical.values()) - 1) < 1e-6
    dist, bound = tv(exact, empirical), tv_bound(exact, N)
    print(f"{shape} {params}: K={len(exact)} TV {dist:.4f} bound {bound:.4f}")
    assert bound < 0.05
    assert dist < bound, f"TV {dist:.4f} >= bound {bound:.4f}"


def test_wrong_q_is_caught():
    """The test has teeth: drafting from q but telling the verifier q is uniform (the classic
    'q is not what was sampled from' bug) is far outside the bound."""
    N = 5000
    exact, empirical = run_random_trees(TREES["chain"][0], T1, N, seed=2, wrong_q=True)
    dist, bound = tv(exact, empirical), tv_bound(exact, N)
    print(f"wrong q: TV {dist:.4f} bound {bound:.4f}")
    assert dist > 2 * bound, f"TV {dist:.4f} vs bound {bound:.4f}"


def kseq_tree(q: dict, cdf: dict, k: int, depth: int, rng: random.Random) -> DraftTree:
    """k i.i.d. sequences of `depth` tokens from the q tables, laid out level by level as
    SpecTr's drafter does (sequence i's level-l node is l * k + i)."""
    tokens, parents, rows, prefixes = [], [], [], [()] * k
    for level in range(depth):
        for i in range(k):
            x = draw(cdf[prefixes[i]], rng)
            parents.append(-1 if level == 0 else len(tokens) - k)
            tokens.append(x)
            rows.append(q[prefixes[i]])
            prefixes[i] += (x,)
    return DraftTree(tokens, parents, torch.stack(rows).float(), kseq=True)


@pytest.mark.parametrize("params", PARAMS)
def test_kseq_rule_is_lossless(params):
    """SpecTr's K-SEQ over 3 i.i.d. sequences (duplicate paths included) two deep (k = 1 is
    plain speculative sampling, the chain cases above)."""
    k, V, depth, N = 3, 4, 2, 12000
    logits, p = table(V, depth + 1, seed=5, params=params)
    q, cdf = draft_tables(V, depth, seed=105, params=params)
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    counts, depths = Counter(), Counter()
    for _ in range(N):
        tree = kseq_tree(q, cdf, k, depth, rng)
        acc = verify_sampling(tree, tree_logits(tree, logits), params, g)
        check_accepted(tree, acc)
        counts[tuple(acc.tokens)] += 1
        depths[len(acc.nodes)] += 1
    assert all(depths[d] > N // 100 for d in range(depth + 1)), depths  # not vacuous
    exact = extend({(): 1.0}, p, depth + 1)
    dist, bound = tv(exact, extend(frequencies(counts, N), p, depth + 1)), tv_bound(exact, N)
    print(f"k-seq {params}: K={len(exact)} TV {dist:.4f} bound {bound:.4f} {depths}")
    assert bound < 0.05
    assert dist < bound, f"TV {dist:.4f} >= bound {bound:.4f}"


def test_kseq_rho_keeps_the_residual_a_distribution_and_more_draws_accept_more():
    from tokenlean.spec_decode.verify import kseq_rho

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, -1)
        q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, -1)
        accept = []
        for k in (1, 2, 4, 8):
            rho, beta = kseq_rho(p, q, k)
            assert 1.0 <= rho <= k
            taken = torch.minimum(q, p / rho) * (1 - (1 - beta) ** k) / beta
            assert (p - taken >= -1e-9).all(), (trial, k)  # the residual is non-negative
            if rho > 1.0 + 1e-6:  # the smallest such rho: a little less breaks it
                lower = rho - 1e-3
                b = float(torch.minimum(q, p / lower).sum())
                assert (1 - (1 - b) ** k) / b > lower
            accept.append(1 - (1 - beta) ** k)  # P(some draw accepted)
        assert rho == 1.0 or accept[0] <= accept[1] + 1e-12 <= accept[-1] + 2e-12
        assert accept[0] == pytest.approx(float(torch.minimum(p, q).sum()))  # k=1: plain SD


# --- end to end: LM.generate with drafters vs the enumerated model distribution ------------

V8 = 8
E2E_RUNS = 3000


class StubTokenizer:
    """What decode_steps needs from a tokenizer, for a model with 8 tokens a..h."""

    eos_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(ord("a") + i) for i in ids)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


def _save_tiny8(folder, seed: int) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    config = transformers.LlamaConfig(
        vocab_size=V8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        # peaked enough that 3000 samples resolve the joint of three tokens (see tv_bound)
        initializer_range=0.5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    # a word-level tokenizer, so the folder also loads as a draft model
    vocab = {chr(ord("a") + i): i for i in range(V8)}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({}))


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    from tokenlean.model.load import load_model

    folder = tmp_path_factory.mktemp("tiny8")
    draft = tmp_path_factory.mktemp("tiny8-draft")
    _save_tiny8(folder, seed=1)
    _save_tiny8(draft, seed=2)  # another random model: a draft that is often wrong
    model = load_model(folder, device="cpu", dtype="fp32")
    lm = LM("tiny8", folder, model, StubTokenizer())
    start = [1, 2, 3]
    # the model's greedy continuation, then the start again: prompt lookup drafts the
    # continuation, which sampling often (not always) follows
    prompt = start + lm.generate(start, 6).token_ids + start
    return lm, prompt, draft


def exact_first3(model, prompt: list[int], params: SamplingParams) -> dict:
    """P(x1, x2, x3) under plain sampling, from all V^2 two-token continuations in one batch."""
    n = len(prompt)
    with torch.inference_mode():
        contexts = [prompt + list(s) for s in itertools.product(range(V8), repeat=2)]
        logits = model(torch.tensor(contexts))  # (V^2, n + 2, V) causal, no cache
        p1 = probabilities(logits[0, n - 1], params).double()  # (V,)
        p2 = probabilities(logits[::V8, n], params).double()  # (V, V) by x1
        p3 = probabilities(logits[:, n + 1], params).double().view(V8, V8, V8)  # by x1, x2
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return {s: float(joint[s]) for s in itertools.product(range(V8), repeat=3) if joint[s] > 0}


E2E_METHODS = ["greedy", *sorted(DRAFTERS)]  # "greedy" with temperature > 0: plain sampling
T1, SHAPED = SamplingParams(1.0), SamplingParams(0.8, 4, 0.9)
# Every method at temperature 1. Shaped sampling (temperature, top-k, top-p) for plain
# sampling, one deterministic drafter (the one-hot rule is the same for all of them), the
# draft model's chain, SpecTr's K-SEQ, and RSD-S: siblings drawn without replacement in a number that varies
# with the beam (RSD-C and DySpec's fixed-order siblings are the same rule at t1).
# online: the draft still learns between requests, in fewer, smaller steps
E2E_OPTIONS = {"online": {"steps": 1, "batch": 4, "update_every": 8}}
E2E_CASES = [pytest.param(m, T1, E2E_OPTIONS.get(m), id=f"{m}-t1") for m in E2E_METHODS] + [
    pytest.param(m, SHAPED, None, id=f"{m}-t0.8-k4-p0.9")
    for m in ("greedy", "pld", "draft", "spectr")
] + [pytest.param("rsd", SHAPED, {"mode": "s", "beam": 3, "depth": 2}, id="rsd-s-t0.8-k4-p0.9")]


@pytest.mark.parametrize(("method", "params", "options"), E2E_CASES)
def test_sampling_through_the_decode_loop_is_lossless(tiny8, method, params, options):
    base, prompt, draft = tiny8
    lm = LM(base.name, base.folder, base.model, base.tokenizer)  # fresh drafters
    args = {"model": str(draft), **(options or {})} \
        if method != "greedy" and DRAFTERS[method].needs_draft_model else options
    exact = exact_first3(lm.model, prompt, params)
    counts, drafted, accepted = Counter(), 0, 0
    for seed in range(E2E_RUNS):
        sampling = SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed)
        # 4 new tokens so the first speculative step may draft 2 deep; compare the first 3
        result = lm.generate(prompt, 4, sampling, method=method, method_args=args)
        assert len(result.token_ids) == 4
        counts[tuple(result.token_ids[:3])] += 1
        drafted += result.stats.get("drafted_tokens", 0)
        accepted += result.stats.get("accepted_tokens", 0)
    if method != "greedy":  # not vacuous: drafts were both accepted and rejected
        assert 0 < accepted < drafted, (accepted, drafted)
    dist, bound = tv(exact, frequencies(counts, E2E_RUNS)), tv_bound(exact, E2E_RUNS)
    print(f"{method} {params}: K={len(exact)} TV {dist:.4f} bound {bound:.4f} "
          f"accepted {accepted}/{drafted}")
    assert bound < 0.1
    assert dist < bound, f"TV {dist:.4f} >= bound {bound:.4f}"
