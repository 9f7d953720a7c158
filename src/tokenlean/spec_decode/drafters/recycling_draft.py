"""Token Recycling that backs off to a draft model: a composition no other tool has.

Token Recycling (Luo et al., arXiv 2408.08696) knows only what the target said after
a token before; where its matrix holds nothing for the root (a token never seen) its
tree is empty. A small draft model (Leviathan et al., arXiv 2211.17192) always has a
guess. Here the draft's greedy chain is grafted onto the recycling tree, sharing the
nodes where both agree, so one forward verifies both: `when=empty` only where the
root's matrix row is empty (a back-off), `when=always` at every step. The chain is the
draft's argmax, a deterministic function of the history like the recycling tree, so
sampling stays exact under the one-hot rule (spec_decode/verify.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenlean.sampling import SamplingParams
from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.drafters.draft_model import DraftModel, DraftModelParams
from tokenlean.spec_decode.drafters.hybrid import graft
from tokenlean.spec_decode.drafters.recycling import RecyclingParams, TokenRecycling
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.zoo import DEFAULT_DRAFT


@dataclass
class RecyclingDraftParams:
    model: str = DEFAULT_DRAFT  # the draft model (same tokenizer)
    when: str = "empty"  # empty: the chain only where the root's row is empty; always
    draft_tokens: int = 4  # the chain's starting length (adapts as the draft method's)
    max_draft_tokens: int = 8
    num_nodes: int = 0  # recycling tree size; 0 = sized for this device
    max_depth: int = 6
    k: int = 8
    warm: str = "auto"  # the recycling matrix's start (see recycling)

    def __post_init__(self):
        if self.when not in ("empty", "always"):
            raise ValueError(f"when must be empty or always, got {self.when!r}")
        self.draft()  # their own checks, as bad options
        self.recycling()

    def recycling(self) -> RecyclingParams:
        return RecyclingParams(self.num_nodes, self.max_depth, self.k, "", self.warm)

    def draft(self) -> DraftModelParams:
        return DraftModelParams(self.model, self.draft_tokens, self.max_draft_tokens)


class RecyclingDraft(Drafter):
    name = "recycling-draft"
    Params = RecyclingDraftParams
    paper = "Token Recycling (arXiv 2408.08696) + a draft model (arXiv 2211.17192)"
    summary = ("Token Recycling tree plus the draft model's greedy chain where the matrix "
               "has nothing for the root (when=always: every step)")
    needs_draft_model = True

    def __init__(self, lm, params: RecyclingDraftParams):
        super().__init__(lm, params)
        extra = params.max_draft_tokens if params.when == "always" else 0
        self.recycling = TokenRecycling(lm, params.recycling(), extra_nodes=extra)
        self.draft = DraftModel(lm, params.draft())
        self.chained = 0  # steps that drafted the chain (reported)

    @property
    def max_nodes(self) -> int:
        return self.recycling.max_nodes + self.params.max_draft_tokens

    def session(self) -> RecyclingDraft:
        session = super().session()
        session.recycling, session.draft = self.recycling.session(), self.draft.session()
        return session

    def start(self, history, sampling=None) -> None:
        self.recycling.start(history, sampling)
        self.draft.start(history, SamplingParams())  # the chain is always the draft's argmax
        self.chained = 0

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        tree = self.recycling.propose(history, max_depth)
        self.chain: list[int] = []
        if self.params.when == "always" or not len(tree):
            self.chained += 1
            self.chain = self.draft.propose(history, max_depth).tokens
            tree = graft(tree, self.chain)
        return tree

    def observe(self, tree, logits, accepted) -> None:
        self.recycling.observe(tree, logits, accepted)
        if self.chain:  # the chain's length adapts to whether the target took all of it
            self.draft.adapt(accepted.tokens[:-1][: len(self.chain)] == self.chain)

    def info(self) -> dict:
        return {"tree_nodes": self.recycling.max_nodes, "chain_steps": self.chained}

    def end(self) -> None:
        self.recycling.end()
