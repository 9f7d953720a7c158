"""Recursive Speculative Decoding: draft trees sampled without replacement.

Jeon et al., "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling
Without Replacement", arXiv 2402.14160.

A draft model grows the tree level by level (one draft forward per level):

- RSD-C (`mode=c`): every node at depth d gets `branches[d]` children, drawn from the
  draft's q without replacement by the Gumbel-top-k trick (top-k of log q + Gumbel).
- RSD-S (`mode=s`): stochastic beam search (Kool et al., arXiv 1903.06059). Each level
  keeps the `beam` best (node, token) pairs over the whole level by their perturbed path
  log-probability, each child's Gumbel conditioned on its parent's perturbed value so
  that the kept paths are a sample without replacement of sequences. A node keeps 0 to
  `beam` children, always the top ones of its own children's Gumbels.

Either way the children of a node are, in order, draws from q without replacement, and
the order does not depend on how many were kept. The target verifies them by recursive
rejection sampling (spec_decode/verify.py): child j is accepted with probability
min(1, p(x)/q_j(x)), q_j being q with the earlier siblings taken out and renormalised
(attached to the tree per node), and after each rejection p <- norm(max(0, p - q_j)).
That keeps the output distributed exactly as plain sampling. With greedy decoding the
trees are the draft's top-k (RSD-C) or its beam search (RSD-S), checked token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenlean.sampling import draw_without_replacement, gumbel, probabilities, without_replacement
from tokenlean.spec_decode.draft_runner import DraftModelDrafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.zoo import DEFAULT_DRAFT

MODES = ("c", "s")


@dataclass
class RSDParams:
    model: str = DEFAULT_DRAFT  # zoo name, checkpoint folder or hub id (same tokenizer)
    mode: str = "c"  # c: constant branching (RSD-C); s: stochastic beam search (RSD-S)
    branches: str = "2,2,1,1"  # RSD-C: children per node at each depth (14 nodes)
    beam: int = 3  # RSD-S: beam width (nodes per level)
    depth: int = 4  # RSD-S: levels

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be c or s, got {self.mode!r}")
        try:
            widths = [int(b) for b in self.branches.split(",")]
        except ValueError:
            raise ValueError(f"branches must be comma-separated counts, got {self.branches!r}") \
                from None
        if not widths or min(widths) < 1 or len(widths) > 16:
            raise ValueError("branches needs 1 to 16 counts, each >= 1")
        if not 1 <= self.beam <= 32 or not 1 <= self.depth <= 16:
            raise ValueError("need 1 <= beam <= 32 and 1 <= depth <= 16")
        if self.mode == "c" and sum(math.prod(widths[: d + 1]) for d in range(len(widths))) > 256:
            raise ValueError(f"branches {self.branches} make a tree of more than 256 nodes")

    @property
    def widths(self) -> list[int]:
        return [int(b) for b in self.branches.split(",")]


class RSD(DraftModelDrafter):
    name = "rsd"
    Params = RSDParams
    paper = "RSD (arXiv 2402.14160)"
    summary = ("draft-model trees sampled without replacement (RSD-C Gumbel-top-k, RSD-S "
               "stochastic beam search), recursive rejection sampling")

    @property
    def max_nodes(self) -> int:
        if self.params.mode == "s":
            return self.params.beam * self.params.depth
        w = self.params.widths
        return sum(math.prod(w[: d + 1]) for d in range(len(w)))

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        depth = min(max_depth, self.runner.context - len(history),
                    self.params.depth if self.params.mode == "s" else len(self.params.widths))
        if depth < 1:
            return DraftTree()
        root = self.runner.catch_up(history)
        grow = self._beam_level if self.params.mode == "s" else self._constant_level
        tree, qrows = DraftTree(), []
        # the frontier: (node, its draft logits, its perturbed path value, its log-prob)
        frontier = [(-1, root, 0.0, 0.0)]
        for level in range(depth):
            first = len(tree)
            children = grow(frontier, level)  # (parent, token, q row or None, value, logp)
            if not children:
                break
            tree = DraftTree(tree.tokens + [c[1] for c in children],
                             tree.parents + [c[0] for c in children])
            qrows += [c[2] for c in children]
            if level + 1 == depth:
                break
            logits = self.runner.extend(tree)
            frontier = [(first + i, logits[i], c[3], c[4]) for i, c in enumerate(children)]
        self.runner.rewind()
        if not self.sampling.greedy and len(tree):
            tree.q = torch.stack(qrows).float()
        return tree

    def _constant_level(self, frontier, level: int) -> list[tuple]:
        """RSD-C: branches[level] children of every frontier node, without replacement."""
        width, out = self.params.widths[level], []
        for node, logits, _, _ in frontier:
            if self.sampling.greedy:
                tokens = logits.topk(width).indices.tolist()
                out += [(node, t, None, 0.0, 0.0) for t in tokens]
                continue
            q = probabilities(logits, self.sampling).double()
            tokens, rows = draw_without_replacement(q, width, self.generator)
            out += [(node, t, row, 0.0, 0.0) for t, row in zip(tokens, rows)]
        return out

    def _beam_level(self, frontier, level: int) -> list[tuple]:
        """RSD-S: the `beam` best (parent, token) pairs of the level, grouped by parent with
        each parent's children in descending order."""
        beam, cands = self.params.beam, []  # (score, parent, token, logp, q)
        for node, logits, value, logp in frontier:
            if self.sampling.greedy:
                lq = torch.log_softmax(logits.double(), -1)
                top = lq.topk(beam)
                cands += [(logp + float(s), node, int(t), logp + float(s), None)
                          for s, t in zip(top.values, top.indices)]
                continue
            q = probabilities(logits, self.sampling).double()
            lq = logp + q.log()
            g = lq + gumbel(q.shape, self.generator, q.device)  # unconditioned perturbed paths
            conditioned = truncated_gumbel(g, value)  # their maximum equals the parent's value
            top = conditioned.topk(min(beam, int((q > 0).sum())))
            cands += [(float(s), node, int(t), float(lq[t]), q)
                      for s, t in zip(top.values, top.indices)]
        kept = sorted(cands, key=lambda c: -c[0])[:beam]
        by_parent: dict[int, list[tuple]] = {}
        for c in kept:  # descending within each parent, parents in frontier order
            by_parent.setdefault(c[1], []).append(c)
        out = []
        for node, *_ in frontier:
            group = by_parent.get(node, [])
            tokens = [c[2] for c in group]
            rows = [None] * len(group) if self.sampling.greedy else \
                without_replacement(group[0][4], tokens) if group else []
            out += [(node, c[2], row, c[0], c[3]) for c, row in zip(group, rows)]
        return out


def truncated_gumbel(g: torch.Tensor, bound: float) -> torch.Tensor:
    """Gumbels g shifted so that their maximum is `bound`, order kept (Kool et al.'s
    numerically stable form of -log(exp(-bound) - exp(-max g) + exp(-g)))."""
    z = g.max()
    v = bound - g + torch.log(-torch.expm1(torch.clamp(g - z, max=0.0)))
    return bound - torch.relu(v) - torch.log1p(torch.exp(-v.abs()))
