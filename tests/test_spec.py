"""Speculative decoding: DraftTree invariants, lossless greedy for every registered drafter,
oracle drafters that must be accepted in full, and the registry / CLI surface.

Sampling-mode distribution tests live in test_verify.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_CONTEXT, TRAIN_TEXT
from tokenlean.decode import Generation, decode_steps
from tokenlean.errors import UserError
from tokenlean.lm import LM
from tokenlean.sampling import SamplingParams
from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.registry import DRAFTERS, make_drafter, method_names, parse_method_args
from tokenlean.spec_decode.tree import DraftTree

METHODS = sorted(DRAFTERS)


def fresh_lm(lm: LM) -> LM:
    """The same weights and tokenizer with no drafters yet (a new process, as far as drafters
    go: Token Recycling starts from the warm matrix, or empty with warm=cold)."""
    return LM(lm.name, lm.folder, lm.model, lm.tokenizer)


# options that keep a drafter's own work small in the registry loops (online: one
# distillation step per update still changes the draft between requests)
CHEAP = {"online": {"steps": 1, "batch": 8}}


def method_args(method: str, draft_dir) -> dict | None:
    """Options a drafter needs to run at all: a draft model that shares the target's tokenizer."""
    if DRAFTERS[method].needs_draft_model:
        return {"model": str(draft_dir), **CHEAP.get(method, {})}
    return CHEAP.get(method)


# --- DraftTree --------------------------------------------------------------------------------

#        root
#       /    \
#     n0      n1
#    /  \       \
#  n2    n3      n4
#         |
#         n5
TOKENS = [10, 11, 12, 13, 14, 15]
PARENTS = [-1, -1, 0, 0, 1, 3]


def test_tree_depths_children_paths():
    tree = DraftTree(TOKENS, PARENTS)
    assert len(tree) == 6
    assert tree.depths == [1, 1, 2, 2, 2, 3]
    assert tree.children == [[0, 1], [2, 3], [4], [], [5], [], []]
    assert tree.paths() == [[0, 2], [0, 3, 5], [1, 4]]


def test_tree_ancestor_mask_exact():
    # rows/columns: root, n0..n5; a node sees the root, its ancestors and itself
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0, 0],  # n0
        [1, 0, 1, 0, 0, 0, 0],  # n1
        [1, 1, 0, 1, 0, 0, 0],  # n2 <- n0
        [1, 1, 0, 0, 1, 0, 0],  # n3 <- n0
        [1, 0, 1, 0, 0, 1, 0],  # n4 <- n1
        [1, 1, 0, 0, 1, 0, 1],  # n5 <- n3 <- n0
    ], dtype=torch.bool)
    mask = DraftTree(TOKENS, PARENTS).ancestor_mask()
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_tree_positions():
    tree = DraftTree(TOKENS, PARENTS)
    assert tree.positions(5).tolist() == [5, 6, 6, 7, 7, 7, 8]
    assert tree.positions(0).tolist() == [0, 1, 1, 2, 2, 2, 3]


def test_tree_mask_agrees_with_paths():
    """The mask row of a node is exactly the root plus the nodes on its root path."""
    tree = DraftTree(TOKENS, PARENTS)
    mask = tree.ancestor_mask()
    for path in tree.paths():
        for i, node in enumerate(path):
            expected = {0, *(n + 1 for n in path[: i + 1])}
            assert set(mask[node + 1].nonzero().flatten().tolist()) == expected


def test_chain():
    tree = DraftTree.chain([7, 8, 9])
    assert tree.tokens == [7, 8, 9]
    assert tree.parents == [-1, 0, 1]
    assert tree.depths == [1, 2, 3]
    assert tree.children == [[0], [1], [2], []]
    assert tree.paths() == [[0, 1, 2]]
    assert torch.equal(tree.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.positions(3).tolist() == [3, 4, 5, 6]
    assert tree.q is None


def test_empty_tree():
    tree = DraftTree()
    assert len(tree) == 0
    assert tree.paths() == []
    assert tree.children == [[]]
    assert torch.equal(tree.ancestor_mask(), torch.ones(1, 1, dtype=torch.bool))
    assert tree.positions(4).tolist() == [4]
    assert DraftTree.chain([]).parents == []


@pytest.mark.parametrize("tokens, parents", [
    ([1], [0]),  # its own parent
    ([1, 2], [1, -1]),  # parent after the child
    ([1], [-2]),  # below the root
    ([1, 2, 3], [-1, 0, 5]),  # out of range
    ([1, 2], [-1]),  # lengths differ
])
def test_tree_rejects_invalid_parents(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)


# --- lossless greedy on the tiny random model ------------------------------------------------

NEW_TOKENS = (1, 2, 3, 7, 16, 40, TINY_CONTEXT)  # cycled; the last runs into the context end


def _tiny_prompts(lm: LM) -> list[list[int]]:
    """>= 50 prompts that give drafters something to match, plus random-token prompts."""
    rng = random.Random(0)
    enc = lm.encode
    cap = TINY_CONTEXT - 28  # room to generate
    texts = []
    for snippet in TRAIN_TEXT:  # code the tokenizer knows, repeated
        texts += [snippet * 2, snippet * 3]
    for a, b in [("x = compute(alpha, beta)\n", "print(x)\n"),
                 ("def g(y):\n    return y * 2\n", "g(3)\n"),
                 ("for k in items:\n    total += k\n", "return total\n"),
                 ("self.x = x\nself.y = y\n", "self.z = z\n"),
                 ("import os\nimport sys\n", "import re\n")]:
        texts.append(a + b + a[: len(a) // 2])  # repeats earlier text, cut mid-way
        texts.append(b + a + b + a)
    prompts = [enc(t)[:cap] for t in texts]
    vocab = lm.tokenizer.vocab_size
    for i in range(18):  # random tokens; half of them repeat a block of themselves
        ids = [rng.randrange(vocab) for _ in range(rng.randint(3, 40))]
        if i % 2:
            block = ids[rng.randrange(len(ids)) :][:8]
            ids = ids + block + ids + block[:3]
        prompts.append(ids[:cap])
    # the model's own continuation shown once, then its start again: a draft that is right
    for seed_text in ("def f(", "class A", "for i", "x = ", "import", "# caf", "while"):
        start = enc(seed_text)
        cont = lm.generate(start, 12, stop_token_ids=[]).token_ids
        prompts.append(start + cont + start)
    return prompts


@dataclasses.dataclass
class Case:
    prompt: list[int]
    n: int
    kwargs: dict
    expected: object  # the plain greedy GenerationResult


@pytest.fixture(scope="module")
def greedy_cases(tiny_lm) -> list[Case]:
    """Per prompt: plain greedy with default stops, then a stop token and a stop string taken
    from the plain output halfway, so drafts that run past them are cut at the same place."""
    cases = []
    for i, prompt in enumerate(_tiny_prompts(tiny_lm)):
        n = NEW_TOKENS[i % len(NEW_TOKENS)]
        cases.append(Case(prompt, n, {}, tiny_lm.generate(prompt, n)))
        full = tiny_lm.generate(prompt, 24, stop_token_ids=[])
        ids = full.token_ids
        if len(ids) >= 4:
            token = ids[len(ids) // 2]
            first = ids.index(token)
            kwargs = {"stop_token_ids": [token]}
            stopped = tiny_lm.generate(prompt, 24, **kwargs)
            assert stopped.token_ids == ids[: first + 1]
            assert stopped.finish_reason == "stop"
            cases.append(Case(prompt, 24, kwargs, stopped))
        text = full.text
        stop = text[len(text) // 2 :][:3]
        if stop.strip():
            kwargs = {"stop": [stop], "stop_token_ids": []}
            stopped = tiny_lm.generate(prompt, 24, **kwargs)
            assert stopped.finish_reason == "stop"
            assert stopped.text == text[: text.find(stop)]
            cases.append(Case(prompt, 24, kwargs, stopped))
    assert len({tuple(c.prompt) for c in cases}) >= 50
    assert sum(c.kwargs.get("stop_token_ids") not in (None, []) for c in cases) >= 30
    assert sum("stop" in c.kwargs for c in cases) >= 30
    return cases


@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_lossless(tiny_lm, greedy_cases, tiny_draft_dir, method):
    lm = fresh_lm(tiny_lm)
    args = method_args(method, tiny_draft_dir)
    mismatches, drafted, accepted = [], 0, 0
    for case in greedy_cases:
        got = lm.generate(case.prompt, case.n, method=method, method_args=args, **case.kwargs)
        want = case.expected
        if (got.token_ids, got.text, got.finish_reason) != \
                (want.token_ids, want.text, want.finish_reason):
            mismatches.append((case.prompt, case.n, case.kwargs, want.token_ids, got.token_ids,
                               want.finish_reason, got.finish_reason))
        drafted += got.stats.get("drafted_tokens", 0)
        accepted += got.stats.get("accepted_tokens", 0)
        assert got.stats["method"] == method
    assert not mismatches, f"{len(mismatches)} of {len(greedy_cases)} differ; first: {mismatches[0]}"
    # not vacuous: the drafter drafted, and the target accepted some of it
    assert drafted > 0 and accepted > 0, (drafted, accepted)


@pytest.fixture(scope="module")
def windowed_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a Mistral-style sliding window of 8 tokens in its config.json."""
    folder = tmp_path_factory.mktemp("tiny-windowed")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_lossless_with_a_sliding_window(tiny_lm, windowed_model_dir, method):
    """A window far shorter than the prompts: a draft tree's nodes must see only the cached
    slots inside their own window, as plain decoding does. The draft method drafts with the
    target itself, so every draft is accepted and the deepest nodes' masks count."""
    from tokenlean.lm import load

    windowed = load(str(windowed_model_dir), device="cpu", dtype="fp32")
    assert windowed.model.config.sliding_window == 8
    prompts = [p for p in _tiny_prompts(windowed) if len(p) > 16]
    plain = [windowed.generate(p, 24, stop_token_ids=[]).token_ids for p in prompts]
    # not vacuous: the window changes what the model says
    assert sum(tiny_lm.generate(p, 24, stop_token_ids=[]).token_ids != ids
               for p, ids in zip(prompts, plain)) >= len(prompts) // 2
    args = method_args(method, windowed_model_dir)
    got = [windowed.generate(p, 24, stop_token_ids=[], method=method, method_args=args)
           for p in prompts]
    differ = [i for i, (g, ids) in enumerate(zip(got, plain)) if g.token_ids != ids]
    assert not differ, f"{len(differ)} of {len(prompts)} differ from plain windowed decoding"
    assert sum(g.stats["accepted_tokens"] for g in got) > 0


# --- lossless greedy on the embedded model ---------------------------------------------------


@pytest.fixture(scope="module")
def code_lm():
    from tokenlean.zoo import zoo_path

    if zoo_path("tl-code") is None:
        pytest.skip("the embedded model tl-code is not installed")
    import tokenlean

    return tokenlean.load(device="cpu")


CODE_PROMPTS, CODE_PROMPT_TOKENS, CODE_NEW_TOKENS = 24, 64, 32


@pytest.fixture(scope="module")
def code_reference(code_lm):
    """Plain greedy continuations of 24 held-out code windows.

    Decoded as one batch (the prompts have equal length): the same argmax loop as
    `method="greedy"`, several times cheaper on a CPU. Three prompts are checked against
    `LM.generate(method="greedy")` here, and the test falls back to it for any prompt whose
    speculative output differs, so batch numerics can never fail the test by themselves.
    """
    from tokenlean.bench.prompts import heldout_prompts

    prompts = [p.ids for p in heldout_prompts(code_lm.tokenizer, CODE_PROMPTS, CODE_PROMPT_TOKENS)]
    model = code_lm.model
    with torch.inference_mode():
        cache = model.new_cache(CODE_PROMPT_TOKENS + CODE_NEW_TOKENS, batch=len(prompts))
        token = model(torch.tensor(prompts), cache=cache, last_n=1)[:, -1].argmax(-1)
        out = [token]
        for _ in range(CODE_NEW_TOKENS - 1):
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
            out.append(token)
    reference = torch.stack(out, 1).tolist()
    for prompt, ref in list(zip(prompts, reference))[:3]:
        assert code_lm.generate(prompt, CODE_NEW_TOKENS, stop_token_ids=[]).token_ids == ref
    return prompts, reference


@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_lossless_on_tl_code(code_lm, code_reference, method):
    cls = DRAFTERS[method]
    if cls.needs_draft_model:
        from tokenlean.zoo import zoo_path

        draft = getattr(cls.Params(), "model", None)
        if draft is None or zoo_path(draft) is None:
            pytest.skip(f"{method}: its default draft model {draft!r} is not installed")
    lm = fresh_lm(code_lm)
    prompts, reference = code_reference
    mismatches = []
    for prompt, ref in zip(prompts, reference):
        got = lm.generate(prompt, CODE_NEW_TOKENS, method=method, method_args=CHEAP.get(method),
                          stop_token_ids=[]).token_ids
        if got != ref:
            plain = code_lm.generate(prompt, CODE_NEW_TOKENS, stop_token_ids=[]).token_ids
            if got != plain:
                mismatches.append((prompt[-8:], plain, got))
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ; first: {mismatches[0]}"


# --- oracle drafters: the target's own future must be accepted in full -----------------------


@dataclasses.dataclass
class OracleParams:
    pass


class Oracle(Drafter):
    """Proposes the target's plain greedy continuation: a chain, or a tree whose first branch
    is wrong (`wrong_first=True`) so only the second one can be accepted."""

    name = "oracle"
    Params = OracleParams
    paper = "test"
    summary = "the target's own future"

    def __init__(self, lm, future: list[int], prompt_len: int, vocab: int,
                 wrong_first: bool = False, depth: int = 4):
        super().__init__(lm, OracleParams())
        self.future, self.prompt_len, self.vocab = future, prompt_len, vocab
        self.wrong_first, self.depth = wrong_first, depth
        self.right_nodes: list[list[int]] = []  # per step: the nodes on the right branch
        self.accepted_nodes: list[list[int]] = []

    @property
    def max_nodes(self) -> int:
        return 2 * len(self.future) + 4

    def start(self, history, *args) -> None:  # newer interfaces pass the sampling params too
        self.started = len(history)

    def propose(self, history, max_depth):
        done = len(history) - self.prompt_len  # tokens emitted so far; future[done - 1] is the root
        right = self.future[done : done + min(max_depth, self.depth)]
        if not self.wrong_first:
            self.right_nodes.append(list(range(len(right))))
            return DraftTree.chain(right)
        if not right:
            self.right_nodes.append([])
            return DraftTree()
        # branch 0: a wrong first token followed by the right continuation (so a verifier that
        # skipped the first token would accept it); branch 1: the right chain
        wrong = [(right[0] + 1) % self.vocab, *right[1:]]
        tokens = wrong + right
        parents = [-1, *range(len(wrong) - 1)] + [-1, *range(len(wrong), len(tokens) - 1)]
        self.right_nodes.append(list(range(len(wrong), len(tokens))))
        return DraftTree(tokens, parents)

    def observe(self, tree, logits, accepted) -> None:
        self.accepted_nodes.append(list(accepted.nodes))


def run_with(lm, drafter, prompt, n, **kwargs):
    steps = decode_steps(lm, prompt, n, SamplingParams(), drafter=drafter, method="oracle",
                         **kwargs)
    generation = Generation(steps)
    for _ in generation:
        pass
    return generation.result


ORACLE_PROMPTS = ["def f(x):\n    return", "class Point:\n", "for i in range(", "# café",
                  "import os\n", "while True:\n"]


@pytest.mark.parametrize("wrong_first", [False, True], ids=["chain", "wrong-branch-first"])
def test_oracle_drafts_are_accepted_in_full(tiny_lm, wrong_first):
    vocab = tiny_lm.model.config.vocab_size
    for text in ORACLE_PROMPTS:
        prompt = tiny_lm.encode(text)
        plain = tiny_lm.generate(prompt, 30, stop_token_ids=[])
        oracle = Oracle(tiny_lm, plain.token_ids, len(prompt), vocab, wrong_first)
        got = run_with(tiny_lm, oracle, prompt, 30, stop_token_ids=[])
        assert got.token_ids == plain.token_ids
        assert got.text == plain.text and got.finish_reason == "length"
        s = got.stats
        right = sum(len(r) for r in oracle.right_nodes)
        assert s["accepted_tokens"] == right > 0
        if not wrong_first:
            assert s["accepted_tokens"] == s["drafted_tokens"]
        assert oracle.accepted_nodes == oracle.right_nodes  # exactly the right branch, every step
        assert s["mean_accepted_tokens"] > 1
        # every draft of depth d reached by a step was accepted there
        assert all(a == 1.0 for a in s["acceptance_per_depth"])


def test_oracle_drafting_past_a_stop_token_stops_there(tiny_lm):
    """The draft runs past the stop token and is accepted; the output still ends at it."""
    prompt = tiny_lm.encode("def add(a, b):\n")
    plain = tiny_lm.generate(prompt, 30, stop_token_ids=[]).token_ids
    token = plain[10]
    first = plain.index(token)
    oracle = Oracle(tiny_lm, plain, len(prompt), tiny_lm.model.config.vocab_size, depth=30)
    got = run_with(tiny_lm, oracle, prompt, 30, stop_token_ids=[token])
    assert got.token_ids == plain[: first + 1]
    assert got.finish_reason == "stop"
    assert got.stats["accepted_tokens"] >= first  # the whole stretch came from one draft or more


def test_oracle_drafting_past_a_stop_string_stops_there(tiny_lm):
    prompt = tiny_lm.encode("for i in range(10):\n")
    plain = tiny_lm.generate(prompt, 30, stop_token_ids=[])
    stop = plain.text[len(plain.text) // 2 :][:2]
    want = tiny_lm.generate(prompt, 30, stop=[stop], stop_token_ids=[])
    oracle = Oracle(tiny_lm, plain.token_ids, len(prompt), tiny_lm.model.config.vocab_size,
                    depth=30)
    got = run_with(tiny_lm, oracle, prompt, 30, stop=[stop], stop_token_ids=[])
    assert (got.token_ids, got.text, got.finish_reason) == \
        (want.token_ids, want.text, "stop")


# --- registry and CLI ------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_ones(tiny_lm):
    with pytest.raises(UserError) as e:
        make_drafter("nope", tiny_lm)
    for name in method_names():
        assert name in str(e.value)
    with pytest.raises(UserError, match="unknown method"):
        tiny_lm.generate("x", 2, method="nope")
    with pytest.raises(UserError, match="unknown method"):
        parse_method_args("nope", ["k=1"])


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_lists_the_valid_ones(method):
    with pytest.raises(UserError) as e:
        parse_method_args(method, ["no_such_option=1"])
    assert "no_such_option" in str(e.value)
    for field in dataclasses.fields(DRAFTERS[method].Params):
        assert field.name in str(e.value)


@pytest.mark.parametrize("method", METHODS)
def test_ill_typed_option_is_a_user_error(method):
    typed = [f for f in dataclasses.fields(DRAFTERS[method].Params)
             if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)]
    assert typed, f"{method} has no numeric option to test"
    with pytest.raises(UserError, match=f"{typed[0].name}.*must be a"):
        parse_method_args(method, [f"{typed[0].name}=abc"])
    with pytest.raises(UserError, match="key=value"):
        parse_method_args(method, [typed[0].name])


def test_option_parsing_types_values():
    assert parse_method_args("pld", ["max_ngram=4", "num_draft_tokens=7"]) == \
        {"max_ngram": 4, "num_draft_tokens": 7}
    assert parse_method_args("pld", {"max_matches": "2"}) == {"max_matches": 2}
    assert parse_method_args("greedy", []) == {}
    with pytest.raises(UserError, match="takes no options"):
        parse_method_args("greedy", ["k=1"])


def test_invalid_option_value_is_a_user_error(tiny_lm):
    with pytest.raises(UserError, match="recycling"):
        make_drafter("recycling", tiny_lm, ["k=99"])


def test_cli_generate_with_pld_reports_spec_stats(capsys, tiny_model_dir, tiny_lm):
    from tokenlean.cli import main

    # a prompt on which prompt lookup finds something to draft (the random model's output
    # must repeat itself or the prompt; which prompts do depends on the weights)
    args = ["max_ngram=2"]
    prompt = next((t * 2 for t in TRAIN_TEXT if fresh_lm(tiny_lm).generate(
        t * 2, 24, method="pld", method_args=args).stats["drafted_tokens"] > 0), None)
    assert prompt is not None, "prompt lookup drafted nothing on any prompt"
    rc = main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", prompt,
               "-n", "24", "--method", "pld", "--method-arg", args[0], "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    stats = result["stats"]
    assert stats["method"] == "pld"
    for key in ("drafts", "drafted_tokens", "accepted_tokens", "acceptance_per_depth",
                "mean_accepted_tokens"):
        assert key in stats, key
    assert stats["drafts"] >= 1 and stats["drafted_tokens"] >= 1
    assert all(a is None or 0 <= a <= 1 for a in stats["acceptance_per_depth"])
    # the CLI reports what the library measures for the same request
    want = fresh_lm(tiny_lm).generate(prompt, 24, method="pld", method_args=args)
    assert result["token_ids"] == want.token_ids
    for key in ("drafts", "drafted_tokens", "accepted_tokens", "acceptance_per_depth",
                "mean_accepted_tokens"):
        assert stats[key] == want.stats[key], key


def test_cli_bad_method_is_one_line(capsys, tiny_model_dir):
    from tokenlean.cli import main

    base = ["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", "x"]
    for extra, fragment in ((["--method", "nope"], "pld"),
                            (["--method", "pld", "--method-arg", "bogus=1"], "max_ngram"),
                            (["--method", "pld", "--method-arg", "max_ngram=x"], "max_ngram")):
        rc = main(base + extra)
        out, err = capsys.readouterr()
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and fragment in err, err


# --- Token Recycling: the matrix is kept across requests and across processes ---------------

RECYCLE_PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"


def test_recycling_matrix_persists_across_requests(tiny_lm):
    lm, cold = fresh_lm(tiny_lm), {"warm": "cold"}  # empty at the start
    first = lm.generate(RECYCLE_PROMPT, 30, method="recycling", method_args=cold,
                        stop_token_ids=[])
    matrix = lm.drafter("recycling", cold).matrix
    assert (matrix >= 0).any(axis=1).sum() > 10  # rows filled from the first request
    second = lm.generate(RECYCLE_PROMPT, 30, method="recycling", method_args=cold,
                         stop_token_ids=[])
    assert second.token_ids == first.token_ids
    # hot start: the second identical request drafts from the first one's matrix
    assert second.stats["drafted_tokens"] > first.stats["drafted_tokens"]
    assert second.stats["accepted_tokens"] >= first.stats["accepted_tokens"]
    assert second.stats["steps"] <= first.stats["steps"]


def test_recycling_matrix_save_load_roundtrip(tiny_lm, tmp_path):
    path = tmp_path / "matrix.npy"
    args = {"matrix_path": str(path)}
    lm1 = fresh_lm(tiny_lm)
    lm1.generate(RECYCLE_PROMPT, 30, method="recycling", method_args=args, stop_token_ids=[])
    assert path.is_file()  # saved when the request ended
    saved = np.load(path)
    assert np.array_equal(saved, lm1.drafter("recycling", args).matrix)
    lm2 = fresh_lm(tiny_lm)  # a new process, as far as drafters go
    assert np.array_equal(lm2.drafter("recycling", args).matrix, saved)
    # both start from the same matrix, so they draft and accept exactly alike
    a = lm1.generate(RECYCLE_PROMPT, 30, method="recycling", method_args=args, stop_token_ids=[])
    b = lm2.generate(RECYCLE_PROMPT, 30, method="recycling", method_args=args, stop_token_ids=[])
    assert a.token_ids == b.token_ids
    for key in ("drafts", "drafted_tokens", "accepted_tokens", "acceptance_per_depth"):
        assert a.stats[key] == b.stats[key], key
    # a matrix of the wrong shape is refused with a clear message
    np.save(tmp_path / "bad.npy", np.zeros((3, 2), dtype=np.int32))
    with pytest.raises(UserError, match="shape"):
        make_drafter("recycling", tiny_lm, {"matrix_path": str(tmp_path / "bad.npy")})


# --- hybrid: the prompt-lookup chain grafted onto the recycling tree --------------------------

def test_graft_shares_the_nodes_the_tree_already_has():
    from tokenlean.spec_decode.drafters.hybrid import graft

    tree = DraftTree(TOKENS, PARENTS)  # root -> 10 -> 13 -> 15 is a path of it
    grafted = graft(tree, [10, 13, 15, 99, 98])
    assert grafted.tokens == TOKENS + [99, 98]
    assert grafted.parents == PARENTS + [5, 6]
    assert graft(tree, [10, 13]).tokens == TOKENS  # already there: nothing added
    assert graft(tree, []).tokens == TOKENS
    other = graft(tree, [12, 10])  # 12 is not a child of the root: a new branch
    assert other.tokens[6:] == [12, 10] and other.parents[6:] == [-1, 6]
    assert [other.tokens[n] for n in other.paths()[-1]] == [12, 10]


def test_hybrid_drafts_the_lookup_continuation(tiny_lm):
    """When the text repeats, the chain prompt lookup finds is in the hybrid's tree."""
    lm = fresh_lm(tiny_lm)
    hybrid = make_drafter("hybrid", lm, {"num_nodes": 4, "lookup_tokens": 5})
    assert hybrid.max_nodes == 9
    history = [50, 51, 52, 53, 54, 55, 56, 57, 50, 51]
    hybrid.start(history)
    tree = hybrid.propose(history, max_depth=8)
    expected = [52, 53, 54, 55, 56]  # what followed 50, 51 before
    paths = [[tree.tokens[n] for n in path] for path in tree.paths()]
    assert any(path[: len(expected)] == expected for path in paths), (expected, paths)
    # no lookup: the recycling tree alone (empty, as its matrix has seen nothing yet)
    alone = make_drafter("hybrid", lm, {"num_nodes": 4, "lookup_tokens": 0, "warm": "cold"})
    alone.start(history)
    assert len(alone.propose(history, max_depth=8)) == 0


@pytest.mark.parametrize("option", ["num_nodes=-1", "k=99", "max_depth=0", "lookup_tokens=-1",
                                    "min_ngram=4"])
def test_hybrid_bad_option_is_a_user_error(tiny_lm, option):
    with pytest.raises(UserError, match="hybrid"):
        make_drafter("hybrid", tiny_lm, [option])


def test_recycling_tree_is_sized_from_the_measured_forward_cost(monkeypatch):
    """num_nodes=0: a GPU-like flat cost takes the largest tree, a CPU-like growing cost a
    small one; a chain scored alongside (hybrid) counts in the cost and in the tokens."""
    from tokenlean.spec_decode import budget
    from tokenlean.spec_decode.drafters.recycling import (
        device_sized_nodes,
        expected_tokens,
        tree_template,
    )

    def sized(costs, **extra):
        monkeypatch.setattr(budget, "forward_costs", lambda model: costs)
        return device_sized_nodes(None, 6, 8, **extra)

    assert sized({s: 1.0 for s in budget.SIZES}) == max(budget.SIZES) - 1
    cpu = {s: 2.5 + 0.14 * (s - 1) for s in budget.SIZES}
    n = sized(cpu)
    assert 1 < n < 30 and n + 1 in cpu

    def rate(m, chain=0, gain=0.0):
        return (expected_tokens(tree_template(m, 6, 8)) + gain) / cpu[m + 1 + chain]

    assert all(rate(n) >= rate(s - 1) for s in cpu if s > 1)  # the best of the measured sizes
    with_chain = sized(cpu, extra_nodes=10, extra_tokens=1.0)
    assert with_chain + 11 in cpu
    assert all(rate(with_chain, 10, 1.0) >= rate(s - 11, 10, 1.0) for s in cpu if s > 11)
    assert sized(cpu, extra_nodes=10, extra_tokens=5.0) <= sized(cpu, extra_nodes=10)


def test_forward_costs_are_non_decreasing_in_the_tree_size(tiny_lm):
    """Timing noise must not make a bigger tree look cheaper than a smaller one: the
    measured costs are fitted to a non-decreasing curve (pool adjacent violators)."""
    from tokenlean.spec_decode.budget import forward_costs, non_decreasing

    assert non_decreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert non_decreasing([5.0, 1.0, 0.0]) == [2.0, 2.0, 2.0]
    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    costs = forward_costs(tiny_lm.model, sizes=(1, 4, 8), cached=16, rounds=2)
    assert sorted(costs) == [1, 4, 8] and all(c > 0 for c in costs.values())
    assert costs[1] <= costs[4] <= costs[8]


def test_forward_costs_are_measured_once_per_device_and_reused(tiny_lm, monkeypatch):
    """The auto-sized tree must not change from one process to the next with timing noise:
    the measured cost curve is kept in the state directory and read back."""
    from tokenlean.spec_decode import budget

    first = budget.forward_costs(tiny_lm.model, sizes=(1, 4, 12), cached=8, rounds=1)
    budget._cost_cache.clear()  # a new process

    def no_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(budget, "measure_costs", no_measure)
    assert budget.forward_costs(tiny_lm.model, sizes=(1, 4, 12), cached=8, rounds=1) == first


def test_recycling_matrix_under_any_file_name_is_reloaded(tiny_lm, tmp_path):
    path = tmp_path / "mat.pt"  # np.save(path) would write mat.pt.npy and start cold next time
    args = {"matrix_path": str(path)}
    lm1 = fresh_lm(tiny_lm)
    lm1.generate(RECYCLE_PROMPT, 30, method="recycling", method_args=args, stop_token_ids=[])
    assert path.is_file() and not (tmp_path / "mat.pt.npy").exists()
    assert np.array_equal(fresh_lm(tiny_lm).drafter("recycling", args).matrix,
                          lm1.drafter("recycling", args).matrix)


@pytest.mark.parametrize("pickled", [False, True])
def test_recycling_matrix_path_to_another_file_is_a_user_error(tiny_lm, tmp_path, pickled):
    path = tmp_path / "other.npy"
    if pickled:  # an object array: np.load refuses its pickled data
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(b"not a matrix\n")
    with pytest.raises(UserError, match="not a saved Token Recycling matrix"):
        make_drafter("recycling", tiny_lm, {"matrix_path": str(path)})
    path2 = tmp_path / "float.npy"
    np.save(path2, np.zeros(fresh_lm(tiny_lm).drafter("recycling").matrix.shape))
    with pytest.raises(UserError, match="integer matrix"):
        make_drafter("recycling", tiny_lm, {"matrix_path": str(path2)})


@pytest.mark.parametrize("option", [["max_ngram=-3"], ["min_ngram=5", "max_ngram=2"],
                                    ["min_ngram=0"], ["num_draft_tokens=0"], ["max_matches=0"]])
def test_pld_bad_option_ranges_are_user_errors(tiny_lm, option):
    with pytest.raises(UserError, match="method 'pld'"):
        make_drafter("pld", tiny_lm, option)
