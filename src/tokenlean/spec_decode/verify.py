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

When no child is accepted (or the node is a leaf) the bonus token is drawn from
what is left of p, so the output is distributed exactly as plain sampling's.
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
    nodes, row = [], 0
    while True:
        choice = best[row]
        child = next((c for c in tree.children[row] if tree.tokens[c] == choice), None)
        if child is None:
            return Accepted(nodes, [tree.tokens[n] for n in nodes] + [choice])
        nodes.append(child)
        row = child + 1


def verify_sampling(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator) -> Accepted:
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
