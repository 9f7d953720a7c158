"""ADED: a tri-gram model of the target, learned while decoding, drafts a searched tree.

Liu et al., "Adaptive Draft-Verification for Efficient Large Language Model
Decoding", arXiv 2407.12021. Our own implementation of its two parts:

- a tri-gram table (prev2, prev1) -> weights of next tokens, with a bigram
  prev1 -> next table to back off to, both fed by the target itself: after each
  verification, the top-k of the target's distribution at every scored tree
  position and the tokens it accepted. Old evidence decays, so the tables follow
  the text being generated; they are shared by all requests and sessions.
- a draft search that balances exploitation and exploration, UCB style: a
  candidate's score is its estimated probability plus
  explore * sqrt(ln(1 + N) / (1 + n)), N counting the drafts made from its
  context and n those that proposed it. The tree grows best-first by the product
  of scores along the path, up to num_nodes nodes.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.tree import DraftTree

MAX_CONTEXTS = 200_000  # per table: a few tens of MB at most


@dataclass
class ADEDParams:
    num_nodes: int = 20  # tree budget: small, so the verification forward stays cheap on a CPU
    max_depth: int = 8
    top_k: int = 4  # target candidates learned per scored position
    decay: float = 0.7  # old evidence of a context is scaled by this at each new observation
    explore: float = 0.1  # weight of the UCB exploration bonus (0: pure exploitation)

    def __post_init__(self):
        if not 1 <= self.num_nodes <= 512:
            raise ValueError("num_nodes must be in [1, 512]")
        if self.max_depth < 1:
            raise ValueError("max_depth must be >= 1")
        if not 1 <= self.top_k <= 32:
            raise ValueError("top_k must be in [1, 32]")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        if not 0.0 <= self.explore <= 10.0:
            raise ValueError("explore must be in [0, 10]")


class Context:
    """What follows one context: next token -> [weight, times proposed], the total weight
    (the estimate is weight / mass) and how many drafts expanded this context."""

    __slots__ = ("next", "mass", "visits")

    def __init__(self):
        self.next: dict[int, list[float]] = {}
        self.mass = 0.0
        self.visits = 0


class Tables:
    """The learned model, one object referenced by every session (shared across requests)."""

    def __init__(self, params: ADEDParams):
        self.params = params
        self.tri: dict[tuple[int, int], Context] = {}
        self.bi: dict[int, Context] = {}
        self.keep = 2 * params.top_k  # entries kept per context: the best survive decay

    def lookup(self, prev2: int | None, prev1: int) -> Context | None:
        ctx = self.tri.get((prev2, prev1)) if prev2 is not None else None
        return ctx if ctx is not None else self.bi.get(prev1)  # back off to the bigram

    def add(self, prev2: int | None, prev1: int, tokens: list[int], probs: list[float]) -> None:
        """One observation (mass 1) of what follows (prev2, prev1), in both tables."""
        keys = [(self.bi, prev1)] if prev2 is None else [(self.tri, (prev2, prev1)), (self.bi, prev1)]
        decay = self.params.decay
        for table, key in keys:
            ctx = table.get(key)
            if ctx is None:
                ctx = table[key] = Context()
                if len(table) > MAX_CONTEXTS:  # bounded memory in a long-lived server:
                    del table[next(iter(table))]  # forget the context created first
            elif decay < 1.0:
                ctx.mass *= decay
                for entry in ctx.next.values():
                    entry[0] *= decay
            ctx.mass += 1.0
            for token, p in zip(tokens, probs):
                entry = ctx.next.get(token)
                if entry is None:
                    ctx.next[token] = [p, 0]
                else:
                    entry[0] += p
            if len(ctx.next) > self.keep:  # forget the weakest
                for token, _ in sorted(ctx.next.items(), key=lambda e: e[1][0])[: len(ctx.next) - self.keep]:
                    del ctx.next[token]


class ADED(Drafter):
    name = "aded"
    Params = ADEDParams
    paper = "Liu et al., Adaptive Draft-Verification for Efficient LLM Decoding (ADED), arXiv 2407.12021"
    summary = "tri-gram model (bigram back-off) learned from the target's top-k drafts a UCB-searched tree"

    def __init__(self, lm, params: ADEDParams):
        super().__init__(lm, params)
        self.tables = Tables(params)  # copy.copy in session() shares it
        self.start([], None)

    @property
    def max_nodes(self) -> int:
        return self.params.num_nodes

    def start(self, history: list[int], sampling=None) -> None:
        self.prev2 = self.root = None
        self.contexts: list[tuple[int | None, int]] = []  # per tree node: (prev2, prev1) it came from

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        p, tables = self.params, self.tables
        self.root = history[-1]
        self.prev2 = history[-2] if len(history) > 1 else None
        depth_limit = min(p.max_depth, max_depth)
        tokens, parents, contexts = [], [], []
        heap: list = []  # (-path score, tie, parent node, token, context key)
        tie = 0

        def expand(node: int, prev2: int | None, prev1: int, depth: int, value: float) -> None:
            nonlocal tie
            ctx = tables.lookup(prev2, prev1)
            if ctx is None or depth > depth_limit or not ctx.next:
                return
            bonus = p.explore * math.sqrt(math.log1p(ctx.visits)) if p.explore else 0.0
            for token, (weight, tried) in ctx.next.items():
                score = weight / ctx.mass + bonus / math.sqrt(1 + tried)
                tie += 1
                heapq.heappush(heap, (-value * score, tie, node, token, (prev2, prev1)))

        expand(-1, self.prev2, self.root, 1, 1.0)
        depth_of: list[int] = []
        while heap and len(tokens) < p.num_nodes:
            neg, _, parent, token, key = heapq.heappop(heap)
            index = len(tokens)
            tokens.append(token)
            parents.append(parent)
            contexts.append(key)
            depth_of.append(1 if parent < 0 else depth_of[parent] + 1)
            expand(index, key[1], token, depth_of[index] + 1, -neg)
        self.contexts = contexts
        return DraftTree(tokens, parents)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted) -> None:
        tables, n = self.tables, len(tree)
        # exploration counts: only the nodes the target actually scored (a batch may cut the tree)
        for key, token in zip(self.contexts[:n], tree.tokens):
            ctx = tables.lookup(*key)
            if ctx is not None:
                ctx.visits += 1
                entry = ctx.next.get(token)
                if entry is not None:
                    entry[1] += 1
        # the target's top-k at every scored position: row 0 follows (prev2, root), row i+1
        # follows (token of node i's parent, token of node i)
        top = torch.topk(logits.float(), self.params.top_k, dim=-1)
        probs = (top.values - torch.logsumexp(logits.float(), dim=-1, keepdim=True)).exp()
        top_tokens, top_probs = top.indices.tolist(), probs.tolist()
        rows = [(self.prev2, self.root)]
        rows += [(tree.tokens[q] if q >= 0 else self.root, tree.tokens[i]) for i, q in enumerate(tree.parents)]
        for (prev2, prev1), toks, ps in zip(rows, top_tokens, top_probs):
            tables.add(prev2, prev1, toks, ps)
        # what was accepted (and the bonus): hard evidence, which sampling may draw outside top-k
        prev2, prev1 = self.prev2, self.root
        for token in accepted.tokens:
            tables.add(prev2, prev1, [token], [1.0])
            prev2, prev1 = prev1, token

    def info(self) -> dict:
        return {"tree_nodes": self.params.num_nodes, "trigram_contexts": len(self.tables.tri)}
