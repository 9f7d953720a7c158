"""SuffixDecoding: the suffix tries, the tree they grow, and the store across requests."""

import time

import pytest

from tokenlean.errors import UserError
from tokenlean.spec_decode.drafters.suffix import SuffixDecoding, SuffixParams, SuffixTrie, children
from tokenlean.spec_decode.registry import make_drafter

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"


def test_trie_finds_the_longest_match_and_continuation_frequencies():
    # after "1 2": 3 twice, 4 once; after "9 1 2": only 4
    trie = SuffixTrie(depth=6)
    trie.add([1, 2, 3, 5, 1, 2, 3, 6, 9, 1, 2, 4, 7])
    n, node = trie.match([8, 1, 2], max_match=4)
    assert n == 2 and {t: kid[0] for t, kid in children(node).items()} == {3: 2, 4: 1}
    n, node = trie.match([9, 1, 2], max_match=4)
    assert n == 3 and list(children(node)) == [4]  # seen once: a leaf


def test_tree_follows_frequencies_and_uncounting_forgets():
    drafter = SuffixDecoding(None, SuffixParams(min_prob=0.3, alpha=4))
    session = drafter.session()
    history = [1, 2, 3, 5, 1, 2, 3, 6, 9, 1, 2, 4, 7, 1, 2]
    session.start(history)
    tree = session.propose(history, max_depth=2)
    # 3 (2/3), then 5 or 6 (1/3 each); 4 (1/3), then 7; nothing deeper than 2
    assert tree.tokens[0] == 3 and set(tree.tokens) == {3, 4, 5, 6, 7}
    assert tree.parents[tree.tokens.index(7)] == tree.tokens.index(4)
    trie = SuffixTrie(depth=6)
    trie.add(history)
    trie.add(history, delta=-1)
    assert trie.root[1] == {}


def test_propose_stays_fast_on_a_long_history():
    drafter = SuffixDecoding(None, SuffixParams()).session()
    history = [(i * 7919) % 1000 for i in range(2000)]
    drafter.start(history)
    times = []
    for _ in range(50):
        history.append(history[-500])
        t0 = time.perf_counter()
        drafter.propose(history, 16)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[25] < 1e-3


def test_bad_options_are_user_errors():
    for option in ("num_nodes=0", "alpha=0", "min_prob=2", "store_tokens=-1", "max_match=0"):
        with pytest.raises(UserError, match="suffix"):
            make_drafter("suffix", None, [option])


@pytest.fixture(scope="module")
def code_lm():
    from tokenlean.lm import load
    from tokenlean.zoo import zoo_path

    if zoo_path("tl-code") is None:
        pytest.skip("the embedded model tl-code is not installed")
    return load("tl-code", device="cpu", dtype="fp32")


def fresh(lm):
    from tokenlean.lm import LM

    return LM(lm.name, lm.folder, lm.model, lm.tokenizer)


def test_a_repeated_task_drafts_the_last_answer_and_stays_exact(code_lm):
    lm = fresh(code_lm)
    plain = lm.generate(PROMPT, 40, stop_token_ids=[]).token_ids
    first = lm.generate(PROMPT, 40, method="suffix", stop_token_ids=[])
    second = lm.generate(PROMPT, 40, method="suffix", stop_token_ids=[])
    assert first.token_ids == plain and second.token_ids == plain
    assert second.stats["mean_accepted_tokens"] > first.stats["mean_accepted_tokens"]
    assert second.stats["mean_accepted_tokens"] > 4


def test_a_cancelled_generation_still_fills_the_store(code_lm):
    lm = fresh(code_lm)
    generation = lm.stream(PROMPT, 40, method="suffix", stop_token_ids=[])
    steps = iter(generation)
    next(steps)
    next(steps)
    steps.close()  # as the server does when a client goes away
    store = lm.drafter("suffix").store
    assert store.tokens > len(lm.encode(PROMPT)) and len(store.docs) == 1


def test_a_finished_request_joins_the_store_whole(code_lm):
    lm = fresh(code_lm)
    result = lm.generate(PROMPT, 12, method="suffix", stop_token_ids=[])
    (doc,) = lm.drafter("suffix").store.docs
    assert list(doc)[-len(result.token_ids):] == result.token_ids  # the last tokens too
