"""Prompt lookup merged into Token Recycling's tree: one forward verifies both.

Token Recycling (Luo et al., arXiv 2408.08696) guesses well one or two tokens
ahead but its tree thins out with depth; prompt lookup (Saxena 2023) is
silent most of the time, but when the text repeats itself (code, edits) its
guess is right many tokens deep. The lookup's best continuation is grafted
onto the recycling tree as a chain, sharing the nodes where both agree, so a
step accepts whichever guess the target agrees with. The adjacency matrix is
refreshed from every scored node, the chain's included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.drafters.pld import PLDParams, PromptLookup
from tokenlean.spec_decode.drafters.recycling import RecyclingParams, TokenRecycling
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import Accepted

# What the lookup chain added to the tokens per step of Token Recycling alone on the code,
# HumanEval and edit tasks of `tokenlean bench spec` (0.7-1.6 on tl-code): a prior for sizing
# the recycling tree, which needs fewer nodes when the chain supplies part of the guesses.
LOOKUP_TOKENS_PER_STEP = 1.0


@dataclass
class HybridParams:
    num_nodes: int = 0  # recycling tree size; 0 = sized for this device, chain included
    lookup_tokens: int = 10  # depth of the prompt-lookup chain
    max_ngram: int = 3
    min_ngram: int = 2  # a 1-token match is too weak a reason to spend nodes on a chain
    max_depth: int = 6  # of the recycling tree
    k: int = 8
    matrix_path: str = ""
    warm: str = "auto"  # the recycling matrix's start: auto, base or cold (see recycling)

    def __post_init__(self):
        if self.lookup_tokens < 0:
            raise ValueError("lookup_tokens must be >= 0")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.recycling()  # its own checks (num_nodes, max_depth, k), as bad options

    def recycling(self) -> RecyclingParams:
        return RecyclingParams(self.num_nodes, self.max_depth, self.k, self.matrix_path, self.warm)

    def lookup(self) -> PLDParams:  # one continuation: the chain
        return PLDParams(self.max_ngram, self.min_ngram, max(1, self.lookup_tokens), max_matches=1)


class LookupRecycling(Drafter):
    name = "hybrid"
    Params = HybridParams
    paper = "Luo et al., Token Recycling, arXiv 2408.08696 + Saxena 2023, prompt lookup"
    summary = "prompt-lookup chain grafted onto the Token Recycling tree, verified in one forward"

    def __init__(self, lm, params: HybridParams):
        super().__init__(lm, params)
        # sized for a forward that scores the chain too, and a step that gains its tokens
        self.recycling = TokenRecycling(lm, params.recycling(), extra_nodes=params.lookup_tokens,
                                        extra_tokens=LOOKUP_TOKENS_PER_STEP)
        self.lookup = PromptLookup(lm, params.lookup())

    @property
    def max_nodes(self) -> int:
        return self.recycling.max_nodes + self.params.lookup_tokens

    def session(self) -> LookupRecycling:
        session = super().session()
        session.recycling, session.lookup = self.recycling.session(), self.lookup.session()
        return session

    def start(self, history, sampling=None) -> None:
        self.lookup.start(history, sampling)
        self.recycling.start(history, sampling)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        tree = self.recycling.propose(history, max_depth)
        if self.params.lookup_tokens:
            chain = self.lookup.propose(history, max_depth).tokens
            tree = graft(tree, chain)
        return tree

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: Accepted) -> None:
        self.recycling.observe(tree, logits, accepted)

    def info(self) -> dict:
        return {"tree_nodes": self.recycling.max_nodes, "lookup_tokens": self.params.lookup_tokens}

    def end(self) -> None:
        self.recycling.end()


def graft(tree: DraftTree, chain: list[int]) -> DraftTree:
    """`tree` plus the path `chain` from the root, reusing the nodes it already has."""
    return tree.graft(DraftTree.chain(chain))
