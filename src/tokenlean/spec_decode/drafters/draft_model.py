"""Speculative sampling with a small draft model (a chain of drafted tokens).

Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative
Decoding", arXiv 2211.17192; Chen et al., "Accelerating Large Language Model
Decoding with Speculative Sampling", arXiv 2302.01318.

The draft model keeps its own KV cache in step with the output (spec_decode/
draft_runner.py): each call truncates it to the longest prefix it shares with the
history and feeds the rest, then samples k tokens one by one from q (shaped by the same temperature /
top-k / top-p as the target's p, and attached to the tree so the verifier uses
the q really sampled from). k adapts to acceptance: +2 after a fully accepted
chain, -1 otherwise (the heuristic transformers' assisted generation uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.sampling import SamplingParams, probabilities, sample
from tokenlean.spec_decode.draft_runner import DraftModelDrafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.zoo import DEFAULT_DRAFT


@dataclass
class DraftModelParams:
    model: str = DEFAULT_DRAFT  # zoo name, checkpoint folder or hub id (same tokenizer)
    num_draft_tokens: int = 4  # starting chain length
    max_draft_tokens: int = 12
    adaptive: bool = True

    def __post_init__(self):
        if not 1 <= self.num_draft_tokens <= self.max_draft_tokens:
            raise ValueError("need 1 <= num_draft_tokens <= max_draft_tokens")


class DraftModel(DraftModelDrafter):
    name = "draft"
    Params = DraftModelParams
    paper = "Leviathan et al. arXiv 2211.17192; Chen et al. arXiv 2302.01318"
    summary = "speculative sampling with a draft model (tl-code-draft), adaptive chain"

    def __init__(self, lm, params: DraftModelParams):
        super().__init__(lm, params)
        self.k = params.num_draft_tokens

    @property
    def max_nodes(self) -> int:
        return self.params.max_draft_tokens

    def start(self, history: list[int], sampling: SamplingParams) -> None:
        super().start(history, sampling)
        self.k = self.params.num_draft_tokens  # each request starts afresh

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        k = min(self.k, max_depth, self.runner.context - len(history))
        if k < 1:
            return DraftTree()
        logits = self.runner.catch_up(history)
        tokens, qs = [], []
        for i in range(k):
            if self.sampling.greedy:  # the verifier compares tokens only: no q needed
                token = int(logits.argmax())
            else:
                q = probabilities(logits, self.sampling)  # (V,) what the token is drawn from
                token = int(sample(q, self.generator))
                qs.append(q)
            tokens.append(token)
            if i + 1 < k:
                logits = self.runner.extend(DraftTree.chain(tokens))[-1]
        self.runner.rewind()
        return DraftTree.chain(tokens, torch.stack(qs) if qs else None)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted) -> None:
        if len(tree):
            self.adapt(len(accepted.nodes) == len(tree))

    def adapt(self, whole_chain_accepted: bool) -> None:
        """The next chain's length: +2 after a chain accepted whole, -1 otherwise."""
        if self.params.adaptive:
            self.k = min(self.k + 2, self.params.max_draft_tokens) if whole_chain_accepted \
                else max(1, self.k - 1)
