"""SuffixDecoding: draft what followed the longest match of the recent tokens, by frequency.

Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
Applications", arXiv 2411.04975. Two suffix structures are searched: one over this
request's prompt + output, and one over earlier requests (shared by every session of
the drafter, so a repeated task drafts the last answer). In each, the longest suffix
of the history that occurred before is found; what followed its occurrences forms a
tree, grown greedily by path probability (the product of the continuations'
empirical frequencies), as deep as alpha x the match length. The better-scoring tree
of the two is proposed.

Both structures are suffix tries of bounded depth: every window of up to
max_match + max_spec tokens is counted, so a node's children count its continuations.
"""

from __future__ import annotations

import gc
import heapq
import math
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.tree import DraftTree


@dataclass
class SuffixParams:
    num_nodes: int = 24  # most nodes in a proposed tree
    max_spec: int = 16  # deepest speculation
    max_match: int = 12  # longest suffix of the history looked up
    alpha: float = 2.0  # speculation depth per matched token (the paper's MAX_SPEC = alpha * p)
    min_prob: float = 0.1  # drop nodes whose path probability is lower
    store_tokens: int = 16384  # earlier requests kept (prompt + output tokens), oldest dropped

    def __post_init__(self):
        if self.num_nodes < 1 or self.max_spec < 1 or self.max_match < 1:
            raise ValueError("num_nodes, max_spec and max_match must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.min_prob <= 1:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
        if self.store_tokens < 0:
            raise ValueError("store_tokens must be >= 0 (0: no store across requests)")


@contextmanager
def gc_paused():
    """A bulk insert makes many small nodes, which the cyclic GC would rescan again and
    again (10x the insert's own time on a 2k-token prompt); none of them form cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class SuffixTrie:
    """Counts of every token window up to `depth` long. A node is [count, {token: node}];
    a window seen once is a leaf [1, None, doc, pos] whose continuation is doc[pos:], so
    the many windows of new text cost one leaf each, not a chain of nodes."""

    def __init__(self, depth: int):
        self.depth = depth
        self.root: list = [0, {}]

    def add(self, doc: list[int], start: int = 0, windows: list | None = None,
            delta: int = 1) -> list:
        """Count (delta=-1: uncount) the windows ending at doc[start:]. windows: the nodes
        of doc's windows still growing (by length), as returned by the last call."""
        windows = windows or []
        for i in range(start, len(doc)):
            token, grown = doc[i], []
            for depth, node in enumerate((self.root, *windows)):
                kids = node[1]
                child = kids.get(token)
                if child is None or (child[1] is None and delta < 0):
                    if delta > 0:  # a new window: it grows along doc, in its leaf
                        kids[token] = [1, None, doc, i + 1]
                    else:
                        del kids[token]
                    continue
                if child[1] is None:  # seen twice: the leaf becomes a node (first seen kept)
                    _, _, doc0, pos = child
                    first = {doc0[pos]: [1, None, doc0, pos + 1]} \
                        if pos < len(doc0) and depth + 1 < self.depth else {}
                    child[1:] = [first]
                child[0] += delta
                if child[0] <= 0:  # uncounted to nothing; its subtree goes with it
                    del kids[token]
                if len(grown) < self.depth - 1:  # a depth-long window grows no further
                    grown.append(child)
            windows = grown
        return windows

    def match(self, history: list[int], max_match: int) -> tuple[int, list | None]:
        """The longest suffix of history (<= max_match) seen with a continuation, and its node.
        A suffix that occurred implies its own suffixes did: the first hit is the longest."""
        for n in range(min(max_match, len(history), self.depth - 1), 0, -1):
            node = self.root
            for token in history[-n:]:
                node = children(node).get(token)
                if node is None:
                    break
            if node is not None and children(node):
                return n, node
        return 0, None


class RequestTrie(SuffixTrie):
    """A suffix trie over one request's prompt + output, extended as the output grows:
    `update(history)` counts only the tokens added since the last call."""

    def __init__(self, depth: int, history: list[int]):
        super().__init__(depth)
        self.seen = list(history)  # the leaves point into it
        with gc_paused():
            self.open = self.add(self.seen)

    def update(self, history: list[int]) -> None:
        indexed = len(self.seen)
        self.seen += history[indexed:]
        self.open = self.add(self.seen, indexed, self.open)


def children(node: list) -> dict:
    if node[1] is not None:
        return node[1]
    _, _, doc, pos = node  # a leaf: its one continuation
    return {doc[pos]: [1, None, doc, pos + 1]} if pos < len(doc) else {}


def grow_tree(node: list, depth: int, budget: int, min_prob: float) -> tuple[DraftTree, float]:
    """The `budget` most probable continuations below `node`, best first, and their summed
    probability (the tokens a step expects to accept)."""
    tokens, parents, score, tie = [], [], 0.0, 0
    heap: list = []

    def push(parent_node, parent_index, prob, level):
        nonlocal tie
        kids = children(parent_node)
        total = sum(kid[0] for kid in kids.values())
        for token, kid in kids.items():
            p = prob * kid[0] / total
            if p >= min_prob:
                tie += 1
                heapq.heappush(heap, (-p, tie, token, kid, parent_index, level))

    push(node, -1, 1.0, 1)
    while heap and len(tokens) < budget:
        neg_p, _, token, kid, parent, level = heapq.heappop(heap)
        score -= neg_p
        tokens.append(token)
        parents.append(parent)  # popped after its parent: parents precede children
        if level < depth:
            push(kid, len(tokens) - 1, -neg_p, level + 1)
    return DraftTree(tokens, parents), score


class SuffixStore:
    """Earlier requests' tokens in one trie, shared by every session; the oldest are
    uncounted once more than `cap` tokens are held."""

    def __init__(self, depth: int, cap: int):
        self.trie, self.cap = SuffixTrie(depth), cap
        self.docs: deque[list[int]] = deque()
        self.tokens = 0
        self.lock = threading.Lock()  # sessions may end on other threads than they draft on

    def add(self, doc: list[int]) -> None:
        doc = doc[-self.cap:] if self.cap else []
        with self.lock, gc_paused():
            if doc:
                self.trie.add(doc)
                self.docs.append(doc)
                self.tokens += len(doc)
            while self.tokens > self.cap:
                old = self.docs.popleft()
                self.trie.add(old, delta=-1)
                self.tokens -= len(old)


class SuffixDecoding(Drafter):
    name = "suffix"
    Params = SuffixParams
    paper = "Oliaro et al., SuffixDecoding, arXiv 2411.04975"
    summary = ("longest suffix match in this request and in earlier ones; a tree of what "
               "followed, by frequency, as deep as the match is long")

    def __init__(self, lm, params: SuffixParams):
        super().__init__(lm, params)
        self.depth = params.max_match + params.max_spec  # a match plus its continuation
        self.store = SuffixStore(self.depth, params.store_tokens)  # shared by the sessions
        self.history: list[int] | None = None  # per sequence, set by start

    @property
    def max_nodes(self) -> int:
        return self.params.num_nodes

    def start(self, history: list[int], sampling=None) -> None:
        self.local = RequestTrie(self.depth, history)
        self.history = history

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        self.local.update(history)
        self.history = history
        p, best = self.params, (DraftTree(), 0.0)
        with self.store.lock:
            for trie in (self.local, self.store.trie):
                n, node = trie.match(history, p.max_match)
                if node is None:
                    continue
                depth = min(max_depth, p.max_spec, math.ceil(p.alpha * n))
                tree = grow_tree(node, depth, p.num_nodes, p.min_prob)
                if tree[1] > best[1]:
                    best = tree
        return best[0]

    def end(self) -> None:
        # the request, finished or cancelled, joins the store (once)
        if self.history is not None:
            self.store.add(list(self.history))
            self.history = None

    def info(self) -> dict:
        return {"store_tokens": self.store.tokens}
