"""DraftTree: the guesses a drafter proposes, as tokens plus parent indices.

Node i holds token `tokens[i]`; its parent is `parents[i]` (-1: the root, the
last token already chosen but not yet in the KV cache). Parents come before
their children. A chain is a tree with one branch. The tree alone derives
what the target's forward needs: the ancestor mask and the positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # (N, V): the draft distribution node i was sampled from (siblings share a row);
    # None for deterministic drafters, whose nodes the verifier treats as one-hot.
    q: torch.Tensor | None = None
    # True: the root's subtrees are i.i.d. draft sequences (duplicates kept apart), verified
    # by SpecTr's K-SEQ over every sequence that still matches (spec_decode/verify.py)
    kseq: bool = False

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents differ in length")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede their children")

    @classmethod
    def chain(cls, tokens: list[int], q: torch.Tensor | None = None) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    def first(self, n: int) -> DraftTree:
        """The tree cut to its first n nodes (parents come first, so it stays a tree): what
        a batch step can afford to verify."""
        if n >= len(self):
            return self
        return DraftTree(self.tokens[:n], self.parents[:n], None if self.q is None else self.q[:n],
                         self.kseq)

    def graft(self, other: DraftTree) -> DraftTree:
        """This tree with every path of `other` inserted by longest-prefix matching: a node
        of `other` whose token its (grafted) parent already has becomes that node, so
        siblings never repeat a token. The new nodes follow this tree's, in `other`'s order
        (parents first). For deterministic trees (no q)."""
        tokens, parents = list(self.tokens), list(self.parents)
        child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
        where: list[int] = []  # other's node -> grafted node
        for t, p in zip(other.tokens, other.parents):
            key = (where[p] if p >= 0 else -1, t)
            if key not in child:
                child[key] = len(tokens)
                tokens.append(t)
                parents.append(key[0])
            where.append(child[key])
        return DraftTree(tokens, parents)

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def depths(self) -> list[int]:
        """Depth of each node; the root's children have depth 1."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    @cached_property
    def children(self) -> list[list[int]]:
        """children[0] are the root's children, children[i + 1] node i's."""
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i)
        return kids

    def ancestor_mask(self, device=None) -> torch.Tensor:
        """(N+1, N+1) bool: row r attends to column c iff c is r or an ancestor of r (root = 0)."""
        n = len(self) + 1
        mask = torch.eye(n, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i + 1] |= mask[p + 1]
        return mask.to(device)

    def positions(self, start: int, device=None) -> torch.Tensor:
        """(N+1,) positions of [root, *nodes] when the root sits at `start`."""
        return torch.tensor([start, *(start + d for d in self.depths)], device=device)

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path, as node indices."""
        out, stack = [], [(i, [i]) for i in reversed(self.children[0])]
        while stack:
            node, path = stack.pop()
            kids = self.children[node + 1]
            if not kids:
                out.append(path)
            stack.extend((k, [*path, k]) for k in reversed(kids))
        return out
