"""Verification: keep the longest lossless path of a draft tree, then one bonus token.

`logits` are the target's, (N+1, V), row 0 at the root and row i+1 at node i.
Every rule walks down from the root, trying a node's children in order:

- greedy: a child is accepted iff its token is the target's argmax there.
- one-hot rule (deterministic drafters: PLD, Token Recycling; no draft
  distribution): accept child x with probability p(x); on rejection set
  p(x) = 0 and renormalise, so a duplicate of a rejected token is rejected.
- speculative sampling / recursive rejection sampling (SpecInfer, arXiv
  2305.09781; Leviathan et al., arXiv 2211.17192): with q the distribution
  child x was drawn from, accept with probability min(1, p(x)/q(x)); on
  rejection p <- norm(max(0, p - q)). i.i.d. siblings share q; siblings drawn
  without replacement carry their own updated q row (RSD, arXiv 2402.14160).

- K-SEQ (SpecTr, arXiv 2310.15141), for a tree of k i.i.d. draft sequences
  (`tree.kseq`): at each depth, the next tokens x_1..x_k' of the k' sequences that
  still match the output, in sequence order, all drawn from the same q. With rho
  the smallest value in [1, k'] such that (1 - (1 - beta)^k') / beta <= rho, where
  beta = sum_x min(q(x), p(x)/rho), x_i is accepted with probability
  min(1, p(x_i) / (rho q(x_i))), the first accepted wins, and every sequence holding
  it goes on. If none is, the bonus comes from the residual
  p(x) - min(q(x), p(x)/rho) (1 - (1 - beta)^k') / beta, normalised.

When no child is accepted (or the node is a leaf) the bonus token is drawn from
what is left of p, so the output is distributed exactly as plain sampling's.
Greedy verification follows every child that holds the target's choice, so a tree
with duplicate paths (K-SEQ's sequences) is walked along all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.sampling import SamplingParams, probabilities, sample
from tokenlean.spec_decode.tree import DraftTree


@dataclass
class Accepted:
    nodes: list[int]  # accepted tree nodes, root to leaf
    tokens: list[int]  # their tokens, then the bonus token


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Accepted:
    best = logits.argmax(-1).tolist()  # (N+1,) the target's choice at root and every node
    survivors, tokens = [-1], []  # the nodes that hold the accepted path (duplicates too)
    while True:
        choice = best[survivors[0] + 1]
        matches = [c for s in survivors for c in tree.children[s + 1] if tree.tokens[c] == choice]
        if not matches:
            return Accepted(path_to(tree, survivors[0]), tokens + [choice])
        tokens.append(choice)
        survivors = matches


def path_to(tree: DraftTree, node: int) -> list[int]:
    """The nodes from the root down to `node` (none for the root itself)."""
    nodes = []
    while node >= 0:
        nodes.append(node)
        node = tree.parents[node]
    return nodes[::-1]


def verify_sampling(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator) -> Accepted:
    if tree.kseq:
        return verify_kseq(tree, logits, params, generator)
    nodes, row = [], 0
    while True:
        p = probabilities(logits[row], params)  # (V,) shaped exactly as plain sampling does
        accepted = None
        for child in tree.children[row]:
            x = tree.tokens[child]
            u = torch.rand((), generator=generator, device=p.device)
            if tree.q is None:  # one-hot rule
                if u < p[x]:
                    accepted = child
                    break
                p = p.clone()
                p[x] = 0.0
            else:
                q = tree.q[child].to(p)
                if u * q[x] < p[x]:  # u < min(1, p/q) without dividing by zero
                    accepted = child
                    break
                p = torch.clamp(p - q, min=0.0)
            total = p.sum()
            if total <= 0:  # only reachable through rounding: nothing left to reject into
                p = probabilities(logits[row], params)
                break
            p = p / total
        if accepted is None:
            bonus = int(sample(p, generator))
            return Accepted(nodes, [tree.tokens[n] for n in nodes] + [bonus])
        nodes.append(accepted)
        row = accepted + 1


def kseq_rho(p: torch.Tensor, q: torch.Tensor, k: int, steps: int = 40) -> tuple[float, float]:
    """(rho, beta): the smallest rho in [1, k] (by bisection, from above) with
    (1 - (1 - beta)^k) / beta <= rho, beta = sum min(q, p / rho): the condition under which
    K-SEQ's residual is non-negative everywhere."""

    def beta(rho: float) -> float:
        return float(torch.minimum(q, p / rho).sum())

    def fits(rho: float) -> bool:
        b = beta(rho)
        return (k if b <= 1e-12 else (1 - (1 - b) ** k) / b) <= rho * (1 + 1e-12)

    if k == 1 or fits(1.0):
        return 1.0, beta(1.0)
    lo, hi = 1.0, float(k)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi, beta(hi)


def verify_kseq(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator) -> Accepted:
    survivors, tokens = [-1], []
    while True:
        p = probabilities(logits[survivors[0] + 1], params).double()
        draws = [c for s in survivors for c in tree.children[s + 1]]  # in sequence order
        if not draws:
            bonus = int(sample(p, generator))
            return Accepted(path_to(tree, survivors[0]), tokens + [bonus])
        q = tree.q[draws[0]].to(p)  # every draw here came from this one q
        rho, beta = kseq_rho(p, q, len(draws))
        choice = None
        for c in draws:
            x = tree.tokens[c]
            u = torch.rand((), generator=generator, device=p.device)
            if u * rho * q[x] < p[x]:  # u < min(1, p / (rho q))
                choice = x
                break
        if choice is None:
            accepted_mass = (1 - (1 - beta) ** len(draws)) / beta if beta > 1e-12 else 0.0
            residual = torch.clamp(p - torch.minimum(q, p / rho) * accepted_mass, min=0.0)
            if residual.sum() <= 0:  # only reachable through rounding
                residual = p
            bonus = int(sample(residual / residual.sum(), generator))
            return Accepted(path_to(tree, survivors[0]), tokens + [bonus])
        tokens.append(choice)
        survivors = [c for c in draws if tree.tokens[c] == choice]
