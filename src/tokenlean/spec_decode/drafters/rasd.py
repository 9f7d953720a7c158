"""RASD: drafts retrieved from a code corpus and this request, optionally fused with a draft model's.

Quan et al., "RASD: Retrieval-Augmented Speculative Decoding", arXiv 2503.03434.

The datastore is a suffix array over `corpus_tokens` tokens of standard-library code (the
zoo's training split), built once per model and kept in the state directory. Each step
the longest suffix of the history (min_match..max_match tokens) is looked up there and,
through a suffix trie, in this request's own prompt + output. What followed each match
(up to max_occurrences corpus occurrences, max_spec tokens each) forms a trie counted by
occurrences; the two tries are laid over one another and the num_nodes nodes of highest
path frequency (each source's own continuation frequencies multiplied down the path)
become the tree. At equal frequency the longer match wins, then the request's own text:
it predicts the request better than the corpus does.

With a draft model (`model`), as in the paper: the retrieval tree is pruned where the
draft gives a node less than min_draft_prob given its parent path (off by default: on
the zoo's models every threshold tried cost more accepted tokens than the nodes it
saved), the draft grows its own greedy tree (top draft_branch per node, draft_depth
levels), and the two are fused by longest-prefix matching, so a token is never drafted
twice under one parent. Every tree is a deterministic function of the history, so
sampling stays exact under the one-hot rule (spec_decode/verify.py).
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenlean.spec_decode.draft_runner import DraftRunner, load_draft
from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.drafters.suffix import RequestTrie, children
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.warm_start import corpus_ids, fingerprint
from tokenlean.zoo import state_dir


@dataclass
class RASDParams:
    model: str = ""  # draft model (zoo name or checkpoint folder); "" = retrieval only
    num_nodes: int = 24  # most nodes in a proposed tree
    max_spec: int = 12  # longest retrieved continuation
    max_match: int = 12  # longest suffix of the history looked up
    min_match: int = 1  # shorter matches draft nothing
    max_occurrences: int = 32  # corpus occurrences merged into the tree
    corpus_tokens: int = 65536  # code tokens in the datastore; 0 = the request only
    min_draft_prob: float = 0.0  # retrieved nodes the draft finds less likely are pruned
    draft_branch: int = 2  # the draft's children per node
    draft_depth: int = 3  # the draft tree's levels

    def __post_init__(self):
        if not 1 <= self.num_nodes <= 256:
            raise ValueError(f"num_nodes must be in [1, 256], got {self.num_nodes}")
        if self.max_spec < 1 or self.max_match < 1 or self.max_occurrences < 1:
            raise ValueError("max_spec, max_match and max_occurrences must be >= 1")
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"min_match must be in [1, max_match={self.max_match}], "
                             f"got {self.min_match}")
        if self.corpus_tokens < 0:
            raise ValueError("corpus_tokens must be >= 0 (0: no corpus)")
        if not 0 <= self.min_draft_prob <= 1:
            raise ValueError(f"min_draft_prob must be in [0, 1], got {self.min_draft_prob}")
        if not 1 <= self.draft_branch <= 16 or not 1 <= self.draft_depth <= 16:
            raise ValueError("draft_branch and draft_depth must be in [1, 16]")


def suffix_array(ids: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of `ids` in lexicographic order (a suffix that is a
    prefix of another sorts first), by prefix doubling: each round sorts by the pair
    (rank of the first k tokens, rank of the next k), O(n log^2 n) inside numpy."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(ids, return_inverse=True)[1].astype(np.int64).reshape(-1)
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)  # -1: past the end, before every token
        second[: max(n - k, 0)] = rank[k:]
        order = np.lexsort((second, rank))
        first, second = rank[order], second[order]
        new = np.empty(n, dtype=np.int64)
        new[order] = np.concatenate(([0], np.cumsum((first[1:] != first[:-1])
                                                    | (second[1:] != second[:-1]))))
        rank = new
        if rank[order[-1]] == n - 1 or k >= n:  # every suffix told apart
            return order
        k *= 2


class Corpus:
    """Token ids and their suffix array: the datastore."""

    def __init__(self, ids, sa: np.ndarray | None = None):
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.sa = suffix_array(self.ids) if sa is None else np.asarray(sa, dtype=np.int64)
        self.heads = self.ids[self.sa]  # first token of each sorted suffix

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, pattern) -> tuple[int, int]:
        """The range [lo, hi) of the suffix array whose suffixes start with `pattern`
        (lo == hi: none). The suffixes in range share pattern[:j], so their j-th tokens
        are sorted: one searchsorted per pattern token narrows the range."""
        n, lo, hi = len(self.ids), 0, len(self.sa)
        for j, token in enumerate(pattern):
            if lo >= hi:
                break
            if j == 0:
                column = self.heads
            else:
                at = self.sa[lo:hi] + j
                column = np.where(at < n, self.ids[np.minimum(at, n - 1)], -1)
            lo, hi = (lo + int(np.searchsorted(column, token, "left")),
                      lo + int(np.searchsorted(column, token, "right")))
        return lo, hi

    def match(self, history: list[int], shortest: int, longest: int) -> tuple[int, np.ndarray]:
        """(n, where each occurrence's continuation starts) for the longest suffix of the
        history of shortest..longest tokens in the corpus; (0, empty) if none. A suffix of
        a match matches too, so the length is found by bisection."""
        best, found = 0, (0, 0)
        lo, hi = shortest, min(longest, len(history))
        while lo <= hi:
            mid = (lo + hi) // 2
            span = self.lookup(history[-mid:])
            if span[0] < span[1]:
                best, found, lo = mid, span, mid + 1
            else:
                hi = mid - 1
        starts = self.sa[found[0] : found[1]] + best
        return best, starts[starts < len(self.ids)]  # the very end has nothing after it


def load_corpus(lm, tokens: int) -> Corpus:
    """The datastore of `lm`: loaded from the state directory, else built and kept there."""
    if not tokens or lm is None or not hasattr(lm.tokenizer, "encode"):
        return Corpus([])
    path = state_dir() / "rasd" / f"{Path(lm.name).name}-{fingerprint(lm.model)}-{tokens}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return Corpus(f["ids"], f["sa"])
    if sys.stderr.isatty():
        print(f"tokenlean: building RASD's datastore for {lm.name} from {tokens} tokens of "
              f"code; kept in {path}", file=sys.stderr)
    corpus = Corpus(corpus_ids(lm.tokenizer, tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:  # through a temporary file, so another process never reads half an array
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=corpus.ids, sa=corpus.sa)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return corpus


def counted_trie(continuations) -> list:
    """Continuations merged into a trie of [count, {token: node}] (suffix.py's node shape)."""
    root: list = [0, {}]
    for seq in continuations:
        node = root
        node[0] += 1
        for token in seq.tolist():
            node = node[1].setdefault(token, [0, {}])
            node[0] += 1
    return root


def grow(sources: list[list], depth: int, budget: int) -> DraftTree:
    """The `budget` nodes of highest path frequency (the product of the empirical
    continuation frequencies, each source's own) in the sources' tries laid over one
    another: a token two sources propose under the same parent is one node. At equal
    frequency the earlier source wins (the longer match). Popped best first, so parents
    come before their children."""
    heap: list = []
    tie = itertools.count()
    tokens, parents, node_of = [], [], {}

    def push(trie: list, parent: int, prob: float, level: int, rank: int) -> None:
        kids = children(trie)
        total = sum(kid[0] for kid in kids.values())
        for token, kid in kids.items():
            heapq.heappush(heap, (-prob * kid[0] / total, rank, next(tie), token, kid, parent, level))

    for rank, trie in enumerate(sources):
        push(trie, -1, 1.0, 1, rank)
    while heap and len(tokens) < budget and depth >= 1:
        neg, rank, _, token, kid, parent, level = heapq.heappop(heap)
        if (parent, token) not in node_of:
            node_of[parent, token] = len(tokens)
            tokens.append(token)
            parents.append(parent)
        if level < depth:
            push(kid, node_of[parent, token], -neg, level + 1, rank)
    return DraftTree(tokens, parents)


def fuse(draft: DraftTree, retrieved: DraftTree, num_nodes: int) -> DraftTree:
    """The draft tree with every retrieved path inserted by longest-prefix matching (draft
    nodes first, then the new retrieved ones by weight), cut to num_nodes."""
    return draft.graft(retrieved).first(num_nodes)


class RASD(Drafter):
    name = "rasd"
    Params = RASDParams
    paper = "Quan et al., RASD, arXiv 2503.03434"
    summary = ("longest matches in a suffix array of code and in the request, a tree of what "
               "followed by frequency; with `model`, fused with a draft model's tree (and "
               "pruned by it, min_draft_prob > 0)")
    needs_draft_model = False

    def __init__(self, lm, params: RASDParams):
        super().__init__(lm, params)
        self.draft = load_draft(lm, params.model) if params.model else None
        self.store: dict = {}  # the corpus, on first use; shared by the sessions
        self.lock = threading.Lock()

    @property
    def max_nodes(self) -> int:
        return self.params.num_nodes

    def corpus(self) -> Corpus:
        with self.lock:  # sessions may start on several threads
            if "corpus" not in self.store:
                self.store["corpus"] = load_corpus(self.lm, self.params.corpus_tokens)
            return self.store["corpus"]

    def start(self, history: list[int], sampling=None) -> None:
        self.corpus()
        p = self.params
        self.local = RequestTrie(p.max_match + p.max_spec, history)
        if self.draft is not None:
            self.runner = DraftRunner(self.draft, p.num_nodes)

    def retrieve(self, history: list[int], depth: int) -> DraftTree:
        """The tree of what followed the longest matches, `depth` deep at most."""
        p = self.params
        self.local.update(history)
        sources = []  # (match length, the request's own text first on ties, trie)
        n, node = self.local.match(history, p.max_match)
        if n >= p.min_match:
            sources.append((n, 1, node))
        corpus = self.corpus()
        m, starts = corpus.match(history, p.min_match, p.max_match)
        if len(starts):
            if len(starts) > p.max_occurrences:  # evenly over the range: sorted by continuation
                starts = starts[np.linspace(0, len(starts) - 1, p.max_occurrences).astype(int)]
            sources.append((m, 0, counted_trie(corpus.ids[s : s + p.max_spec] for s in starts)))
        sources.sort(key=lambda s: s[:2], reverse=True)
        return grow([trie for *_, trie in sources], min(depth, p.max_spec), p.num_nodes)

    def prune(self, tree: DraftTree, root: torch.Tensor) -> DraftTree:
        """`tree` without the nodes (and their subtrees) the draft gives less than
        min_draft_prob given their parent path; root: the draft's logits at the root."""
        logits = self.runner.extend(tree)
        self.runner.rewind()
        probs = torch.cat((root[None], logits)).float().softmax(-1)  # row 0: the root
        rows = torch.tensor(tree.parents, device=probs.device) + 1
        given = probs[rows, torch.tensor(tree.tokens, device=probs.device)].tolist()
        tokens, parents, where = [], [], []  # where: old node -> new (None: pruned)
        for t, p, q in zip(tree.tokens, tree.parents, given):
            if q < self.params.min_draft_prob or (p >= 0 and where[p] is None):
                where.append(None)
                continue
            where.append(len(tokens))
            tokens.append(t)
            parents.append(where[p] if p >= 0 else -1)
        return DraftTree(tokens, parents)

    def draft_tree(self, root: torch.Tensor, depth: int) -> DraftTree:
        """The draft's greedy tree: its top draft_branch tokens under each node, level by
        level (one forward each), no more than num_nodes in all."""
        p = self.params
        tokens, parents, frontier = [], [], [(-1, root)]
        for level in range(min(depth, p.draft_depth)):
            first = len(tokens)
            for parent, logits in frontier:
                for t in logits.topk(p.draft_branch).indices.tolist()[: p.num_nodes - len(tokens)]:
                    tokens.append(t)
                    parents.append(parent)
            if len(tokens) >= p.num_nodes or level + 1 == min(depth, p.draft_depth):
                break
            logits = self.runner.extend(DraftTree(tokens, parents))  # this level's nodes
            frontier = list(zip(range(first, len(tokens)), logits))
        self.runner.rewind()
        return DraftTree(tokens, parents)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        if self.draft is None:
            return self.retrieve(history, max_depth)
        room = min(max_depth, self.runner.context - len(history))
        if room < 1:  # beyond the draft's context: retrieval alone (still exact)
            return self.retrieve(history, max_depth)
        retrieved = self.retrieve(history, room)
        root = self.runner.catch_up(history)
        try:
            if len(retrieved) and self.params.min_draft_prob > 0:  # 0: nothing to prune
                retrieved = self.prune(retrieved, root)
            return fuse(self.draft_tree(root, room), retrieved, self.params.num_nodes)
        finally:
            self.runner.rewind()

    def info(self) -> dict:
        corpus = self.store.get("corpus")
        return {"rasd_corpus_tokens": len(corpus)} if corpus is not None else {}
