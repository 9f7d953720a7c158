"""DySpec: a draft tree grown greedily, node by node, under a budget the device sets.

Xiong et al., "DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure",
arXiv 2410.11744.

The draft probability of a path estimates how likely the target is to accept it, so
the tree is grown best-first: a heap of candidates valued by that estimate, the best
popped into the tree until the token budget is spent. Popping a node makes its next
sibling a candidate; expanding it (one draft forward per round of up to `per_round`
popped nodes) makes its first child one. The budget is the tree size that maximises
(1 + the values of the nodes it holds) / (the target's measured cost of scoring them),
from the previous step's values and the device's cost curve (spec_decode/budget.py).

Siblings are the draft's tokens in order: greedy, by probability; sampling, draws
without replacement from q (Gumbel-top-k), each valued by the expected draft
probability of that draw given the earlier ones, which does not depend on the token
drawn. So which siblings join the tree never depends on their own identity, and the
target verifies them exactly by recursive rejection sampling (spec_decode/verify.py,
the rule RSD uses).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from tokenlean.sampling import SamplingParams, draw_without_replacement, probabilities
from tokenlean.spec_decode.budget import best_size, forward_costs
from tokenlean.spec_decode.draft_runner import DraftModelDrafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.zoo import DEFAULT_DRAFT


@dataclass
class DySpecParams:
    model: str = DEFAULT_DRAFT  # zoo name, checkpoint folder or hub id (same tokenizer)
    num_nodes: int = 0  # token budget; 0 = set each step from the device's cost curve
    max_nodes: int = 32  # the most the budget may reach
    per_round: int = 8  # nodes popped per draft forward
    siblings: int = 8  # candidates per node, in the draft's order

    def __post_init__(self):
        if not 1 <= self.max_nodes <= 79:
            raise ValueError("max_nodes must be in [1, 79]")
        if not 0 <= self.num_nodes <= self.max_nodes:
            raise ValueError("num_nodes must be in [0, max_nodes] (0 = auto)")
        if self.per_round < 1 or not 1 <= self.siblings <= 64:
            raise ValueError("need per_round >= 1 and 1 <= siblings <= 64")


@dataclass
class Candidate:
    base: float  # the parent's value (1 at the root)
    parent: int
    rank: int  # its place among the parent's siblings
    options: list  # the parent's sibling tokens, in order
    rows: list  # the q each was drawn from (sampling), else Nones
    scale: list  # each sibling's draft probability (expected, when sampling)

    @property
    def value(self) -> float:
        """The estimated chance that the target accepts the path to this candidate."""
        return self.base * self.scale[self.rank]


class DySpec(DraftModelDrafter):
    name = "dyspec"
    Params = DySpecParams
    paper = "DySpec (arXiv 2410.11744)"
    summary = "draft-model tree grown best-first by draft probability, budget from the cost curve"

    @property
    def max_nodes(self) -> int:
        return self.params.max_nodes

    def start(self, history: list[int], sampling: SamplingParams) -> None:
        super().start(history, sampling)
        self.values: list[float] = []  # the previous tree's node values, in pop order

    def _budget(self) -> int:
        """Fixed before this step's draws, from the last step's values (so it cannot depend
        on the tokens drawn now)."""
        if self.params.num_nodes:
            return self.params.num_nodes
        if not self.values:  # the first step: a middling tree
            return min(16, self.params.max_nodes)
        costs = {s: c for s, c in forward_costs(self.lm.model).items()
                 if s - 1 <= self.params.max_nodes}
        values = self.values

        def expected(n: int) -> float:
            return 1.0 + sum(values[:n])

        return best_size(costs, expected) if len(costs) > 1 else self.params.max_nodes

    def _siblings(self, logits: torch.Tensor, value: float, parent: int) -> Candidate | None:
        """The parent's sibling list as one candidate (its first), or None if q is empty."""
        k = self.params.siblings
        if self.sampling.greedy:
            q = torch.softmax(logits.double(), -1)
            top = q.topk(k)
            return Candidate(value, parent, 0, top.indices.tolist(), [None] * k,
                             top.values.tolist())
        q = probabilities(logits, self.sampling).double()
        tokens, rows = draw_without_replacement(q, k, self.generator)
        scale = [float((row * q).sum()) for row in rows]  # E[q(x_j)] given the earlier draws
        return Candidate(value, parent, 0, tokens, rows, scale)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        room = min(max_depth, self.runner.context - len(history))
        if room < 1:
            return DraftTree()
        budget = self.last_budget = self._budget()
        root = self.runner.catch_up(history)
        tokens, parents, rows, values, depth = [], [], [], [], []
        heap: list = []
        counter = 0  # heap tie-breaker

        def push(c: Candidate | None):
            nonlocal counter
            if c is not None:
                heapq.heappush(heap, (-c.value, counter, c))
                counter += 1

        push(self._siblings(root, 1.0, -1))
        while heap and len(tokens) < budget:
            first = len(tokens)
            while heap and len(tokens) < budget and len(tokens) - first < self.params.per_round:
                _, _, c = heapq.heappop(heap)
                tokens.append(c.options[c.rank])
                parents.append(c.parent)
                rows.append(c.rows[c.rank])
                values.append(c.value)
                depth.append(1 if c.parent < 0 else depth[c.parent] + 1)
                if c.rank + 1 < len(c.options):  # its next sibling
                    push(Candidate(c.base, c.parent, c.rank + 1, c.options, c.rows, c.scale))
            expand = [i for i in range(first, len(tokens)) if depth[i] < room]
            if len(tokens) >= budget or not expand:
                continue
            fed = self.runner.fed
            logits = self.runner.extend(DraftTree(tokens, parents))  # nodes fed.. (all new)
            for i in expand:
                push(self._siblings(logits[i - fed], values[i], i))
        self.runner.rewind()
        # the values the next budget is set from: these nodes, then the best left waiting
        self.values = values + sorted((-v for v, _, _ in heap), reverse=True)
        tree = DraftTree(tokens, parents)
        if not self.sampling.greedy and tokens:
            tree.q = torch.stack(rows).float()
        return tree

    def info(self) -> dict:
        return {"tree_budget": self.last_budget} if hasattr(self, "last_budget") else {}
