"""RASD: the suffix array, retrieval from the request and the corpus, the datastore cache,
pruning and fusion with a draft model, and greedy exactness."""

import random
from collections import Counter

import numpy as np
import pytest
import torch

from tokenlean.errors import UserError
from tokenlean.lm import LM
from tokenlean.spec_decode.drafters import rasd
from tokenlean.spec_decode.drafters.rasd import RASD, Corpus, RASDParams, fuse, suffix_array
from tokenlean.spec_decode.registry import make_drafter
from tokenlean.spec_decode.tree import DraftTree

CORPUS = 3000  # tokens: enough code to match in, quick to build


def fresh(lm):
    return LM(lm.name, lm.folder, lm.model, lm.tokenizer)


def paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Every node as the tuple of tokens from the root down to it."""
    out: list[tuple[int, ...]] = []
    for t, p in zip(tree.tokens, tree.parents):
        out.append((*out[p], t) if p >= 0 else (t,))
    return set(out)


def model_free(corpus=None, **options) -> RASD:
    """A session of a drafter without a model; `corpus`: ids to retrieve from."""
    drafter = RASD(None, RASDParams(corpus_tokens=0, **options))
    if corpus is not None:
        drafter.store["corpus"] = Corpus(corpus)
    return drafter.session()


def propose(session: RASD, history: list[int], max_depth: int = 16) -> DraftTree:
    session.start(history)
    return session.propose(history, max_depth)


# --- the datastore ----------------------------------------------------------------------------


def test_suffix_array_equals_brute_force():
    rng = random.Random(0)
    cases = [[], [5], [2] * 40, [1, 2] * 20 + [1]]
    cases += [[rng.randrange(alphabet) for _ in range(rng.randrange(2, 300))]
              for alphabet in (2, 3, 5, 50) for _ in range(5)]
    for ids in cases:
        got = suffix_array(np.array(ids, dtype=np.int64)).tolist()
        assert got == sorted(range(len(ids)), key=lambda i: ids[i:]), ids


def test_lookup_finds_exactly_the_occurrences():
    rng = random.Random(1)
    ids = [rng.randrange(4) for _ in range(500)]
    corpus = Corpus(ids)
    patterns = [ids[i : i + m] for i in rng.sample(range(490), 20) for m in (1, 3, 6)]
    patterns += [[rng.randrange(4) for _ in range(8)] for _ in range(20)] + [[9], [0, 9, 0]]
    found = 0
    for pattern in patterns:
        lo, hi = corpus.lookup(pattern)
        want = [i for i in range(len(ids)) if ids[i : i + len(pattern)] == pattern]
        assert sorted(corpus.sa[lo:hi].tolist()) == want, pattern
        found += bool(want)
    assert 0 < found < len(patterns)  # both found and not found were tried
    # the longest suffix: 6 tokens at most, continuations right after every occurrence
    history = [7, *ids[100:106]]
    n, starts = corpus.match(history, 1, 6)
    assert n == 6
    assert sorted(starts.tolist()) == [i + 6 for i in range(len(ids) - 6)
                                       if ids[i : i + 6] == ids[100:106]]
    assert corpus.match([9, 9], 1, 6)[0] == 0


def test_the_datastore_is_built_once_and_kept(tiny_lm, monkeypatch):
    first = make_drafter("rasd", fresh(tiny_lm), {"corpus_tokens": 2500})
    a, b = first.session(), first.session()
    a.start([1, 2])
    b.start([1, 2])
    assert a.corpus() is b.corpus() and len(a.corpus()) == 2500  # shared by the sessions
    assert list((rasd.state_dir() / "rasd").glob(f"*-{2500}.npz"))

    def no_build(ids):
        raise AssertionError("the datastore was built again")

    monkeypatch.setattr(rasd, "suffix_array", no_build)
    second = make_drafter("rasd", fresh(tiny_lm), {"corpus_tokens": 2500}).session()
    second.start([1, 2])
    assert np.array_equal(second.corpus().ids, a.corpus().ids)
    assert np.array_equal(second.corpus().sa, a.corpus().sa)
    assert second.info() == {"rasd_corpus_tokens": 2500}


# --- retrieval ------------------------------------------------------------------------------


def test_a_repeated_span_drafts_its_continuation():
    history = [5, 6, 7, 8, 9, 10, 11, 1, 2, 5, 6, 7]
    tree = propose(model_free(), history)
    assert tree.tokens[:4] == [8, 9, 10, 11] and tree.parents[:4] == [-1, 0, 1, 2]
    assert max(propose(model_free(), history, max_depth=2).depths) == 2
    assert len(propose(model_free(), [1, 2, 3, 4, 5])) == 0  # nothing repeats
    assert len(propose(model_free(min_match=3), [1, 2, 3, 4, 2, 3])) == 0  # too short


def test_the_longest_match_wins_then_frequency():
    # "2 3" was followed by 20 twice and by 10 once, "1 2 3" by 10
    context = [1, 2, 3, 10, 5, 2, 3, 20, 5, 2, 3, 20, 9]
    assert propose(model_free(), context + [1, 2, 3]).tokens[0] == 10
    tree = propose(model_free(), context + [7, 2, 3])
    assert tree.tokens[0] == 20 and 10 in tree.tokens


def test_context_wins_ties_and_a_longer_corpus_match_wins():
    corpus = [4, 1, 2, 3, 30] * 5 + [7, 1, 2, 50] * 3 + [7, 1, 2, 60]
    # "1 2 3": 10 in the request, 30 in the corpus (five times): the request's own text wins
    assert propose(model_free(corpus, max_match=3), [1, 2, 3, 10, 8, 1, 2, 3]).tokens[0] == 10
    # "4 1 2 3" only in the corpus: longer than the request's "1 2 3"
    assert propose(model_free(corpus, max_match=4), [1, 2, 3, 10, 4, 1, 2, 3]).tokens[0] == 30
    # corpus occurrences are counted: 50 three times, 60 once
    tree = propose(model_free(corpus), [8, 7, 1, 2])
    assert tree.tokens[0] == 50 and 60 in tree.tokens[1:]
    # both say 10 11 after "1 2 3": one path, the two continuations branch after it
    tree = propose(model_free([5, 1, 2, 3, 10, 11] * 2, max_match=3), [1, 2, 3, 10, 11, 8, 1, 2, 3])
    assert tree.children[0] == [0] and tree.tokens[:2] == [10, 11]
    assert sorted(tree.tokens[k] for k in tree.children[2]) == [5, 8]


def test_corpus_occurrences_are_capped():
    corpus = [x for k in range(40) for x in (1, 2, 100 + k)]
    tree = propose(model_free(corpus, max_occurrences=8), [9, 1, 2])
    assert len(tree.children[0]) == 8
    assert len(propose(model_free(corpus), [9, 1, 2]).children[0]) == 24  # num_nodes


def test_the_code_corpus_drafts_what_followed(tiny_lm):
    session = make_drafter("rasd", fresh(tiny_lm), {"corpus_tokens": CORPUS}).session()
    session.start([0])
    ids = session.corpus().ids.tolist()
    # a 12-token span that occurs once: its continuation (max_spec=12) is drafted first
    seen = Counter(tuple(ids[j : j + 12]) for j in range(CORPUS - 11))
    i = next(i for i in range(200, CORPUS - 30) if seen[tuple(ids[i : i + 12])] == 1)
    history = ids[i : i + 12]
    tree = propose(session, history)
    assert tree.tokens[:12] == ids[i + 12 : i + 24] and tree.parents[:12] == list(range(-1, 11))
    assert tree.q is None


# --- with a draft model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_draft(tiny_lm, tiny_model_dir):
    return make_drafter("rasd", tiny_lm, {"model": str(tiny_model_dir), "corpus_tokens": CORPUS,
                                          "min_draft_prob": 0.02})


@torch.inference_mode()
def draft_probs(drafter: RASD, ids: list[int]) -> torch.Tensor:
    """The draft's next-token distribution after ids, uncached."""
    return drafter.draft(torch.tensor([ids]))[0, -1].float().softmax(-1)


def test_pruning_drops_what_the_draft_finds_unlikely(tiny_lm, with_draft):
    history = tiny_lm.tokenizer.encode("def add(a, b):\n")
    session = with_draft.session()
    session.start(history)
    root = draft_probs(session, history)
    likely, unlikely = int(root.argmax()), int(root.argmin())
    under = draft_probs(session, history + [likely])
    tree = DraftTree([likely, unlikely, int(under.argmax()), int(under.argmin()), likely],
                     [-1, -1, 0, 0, 1])
    # brute force: a node stays iff its parent did and the draft gives it >= min_draft_prob
    want: set[tuple[int, ...]] = set()
    for path in sorted(paths(tree), key=len):
        if (len(path) == 1 or path[:-1] in want) and \
                draft_probs(session, history + list(path[:-1]))[path[-1]] >= 0.02:
            want.add(path)
    pruned = session.prune(tree, session.runner.catch_up(history))
    session.runner.rewind()
    assert paths(pruned) == want
    assert 0 < len(want) < len(tree)  # some kept, some dropped
    assert (unlikely,) not in want and (unlikely, likely) not in paths(pruned)


def test_the_fused_tree_holds_the_draft_tree_and_no_duplicate_siblings(tiny_lm, tiny_model_dir):
    # nothing pruned: the random draft would find the retrieved code unlikely
    session = make_drafter("rasd", tiny_lm, {"model": str(tiny_model_dir), "corpus_tokens": CORPUS,
                                             "min_draft_prob": 0}).session()
    text = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"
    history = tiny_lm.tokenizer.encode(text)
    session.start(history)
    tree = session.propose(history, 8)
    root = session.runner.catch_up(history)
    draft = session.draft_tree(root, 8)
    retrieved = session.prune(session.retrieve(history, 8), root)
    session.runner.rewind()
    assert tree.q is None and 0 < len(tree) <= session.max_nodes
    assert len(draft) == 2 + 4 + 8  # draft_branch=2, draft_depth=3
    assert paths(draft) <= paths(tree)
    assert paths(retrieved) - paths(draft)  # retrieval added something
    both = paths(draft) | paths(retrieved)
    assert paths(tree) <= both and len(tree) == min(24, len(both))
    assert all(p < i for i, p in enumerate(tree.parents))
    for kids in tree.children:
        assert len({tree.tokens[k] for k in kids}) == len(kids)


def test_fuse_shares_prefixes_and_caps_the_size():
    draft = DraftTree([1, 2, 3], [-1, -1, 0])  # 1 -> 3, 2
    retrieved = DraftTree([1, 3, 4, 5], [-1, 0, 1, 0])  # 1 -> 3 -> 4, 1 -> 5
    fused = fuse(draft, retrieved, 8)
    assert fused.tokens == [1, 2, 3, 4, 5] and fused.parents == [-1, -1, 0, 2, 0]
    assert fuse(draft, retrieved, 4).tokens == [1, 2, 3, 4]


def test_greedy_is_exact_with_the_draft_model(tiny_lm, tiny_model_dir):
    prompts = ["def add(a, b):\n    return a + b\n" * 3, "class Point:\n", "for i in"]
    for prune in (0, 0.02):
        lm = fresh(tiny_lm)
        args = {"model": str(tiny_model_dir), "corpus_tokens": CORPUS, "min_draft_prob": prune}
        for prompt in prompts:
            got = lm.generate(prompt, 24, method="rasd", method_args=args)
            assert got.token_ids == tiny_lm.generate(prompt, 24).token_ids, (prompt, prune)
            if prompt == prompts[0]:
                assert got.stats["accepted_tokens"] > 0


def test_bad_options_are_user_errors():
    for option in ({"max_match": 0}, {"min_match": 5, "max_match": 4}, {"num_nodes": 0},
                   {"corpus_tokens": -1}, {"min_draft_prob": 2}, {"draft_branch": 0}):
        with pytest.raises(UserError, match="rasd"):
            make_drafter("rasd", None, option)
