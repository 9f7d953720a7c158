"""The drafter interface: propose a DraftTree, then learn from what the target said."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from tokenlean.sampling import SamplingParams
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import Accepted


class Drafter:
    """Subclasses set `name`, `Params` (a dataclass of hyperparameters) and `paper`."""

    name: ClassVar[str]
    Params: ClassVar[type]
    paper: ClassVar[str]
    summary: ClassVar[str]
    needs_draft_model: ClassVar[bool] = False

    def __init__(self, lm, params):
        self.lm = lm
        self.params = params

    @property
    def max_nodes(self) -> int:
        """The most nodes a proposed tree holds (the KV cache keeps room for them)."""
        raise NotImplementedError

    def session(self) -> Drafter:
        """This drafter for one sequence. The copy shares what is learned across requests
        (Token Recycling's matrix, a draft model's weights) and keeps its own per-sequence
        state (a lookup index, a draft cache, the current root), set up by `start`, so
        sequences decoded side by side do not disturb one another."""
        return copy.copy(self)

    def start(self, history: list[int], sampling: SamplingParams) -> None:
        """A new request begins with these prompt tokens and sampling parameters."""

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        """Guesses to follow `history` (prompt + output so far), at most max_depth deep."""
        raise NotImplementedError

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: Accepted) -> None:
        """The target's logits over [root, *tree] and what was accepted."""

    def end(self) -> None:
        """The request is over, finished or cancelled (e.g. persist learned state)."""

    def info(self) -> dict:
        """Drafter facts worth reporting with a generation's stats (e.g. the tree size)."""
        return {}
