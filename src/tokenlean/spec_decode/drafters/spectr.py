"""SpecTr: k i.i.d. draft sequences, verified by K-SEQ draft selection.

Sun et al., "SpecTr: Fast Speculative Decoding via Optimal Transport", arXiv 2310.15141.

The draft model samples `num_seqs` sequences of `length` tokens independently from q
(one draft forward per level over all of them; sequences that share a prefix draw from
the very same q). The tree keeps every sequence as its own chain, duplicates included,
laid out level by level, so cutting it to its first n nodes never depends on which
tokens were drawn. The target verifies it with K-SEQ (spec_decode/verify.py): at each
depth, the next tokens of every sequence that still matches the output compete under
the acceptance rule min(1, p / (rho q)), rho chosen so that the residual stays a
distribution. With k = 1 it is plain speculative sampling; a larger k raises the chance
that some draw is accepted. With greedy decoding the sequences are sampled from the
draft at temperature 1 (seeded) and checked token by token along every matching path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.sampling import probabilities, sample
from tokenlean.spec_decode.draft_runner import DraftModelDrafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.zoo import DEFAULT_DRAFT


@dataclass
class SpecTrParams:
    model: str = DEFAULT_DRAFT  # zoo name, checkpoint folder or hub id (same tokenizer)
    num_seqs: int = 4  # k: draft sequences
    length: int = 4  # tokens per sequence

    def __post_init__(self):
        if not 1 <= self.num_seqs <= 32 or not 1 <= self.length <= 16:
            raise ValueError("need 1 <= num_seqs <= 32 and 1 <= length <= 16")


class SpecTr(DraftModelDrafter):
    name = "spectr"
    Params = SpecTrParams
    unseeded = 1  # greedy decoding samples its drafts too: reproducibly
    paper = "SpecTr (arXiv 2310.15141)"
    summary = "k i.i.d. draft-model sequences verified by K-SEQ draft selection"

    @property
    def max_nodes(self) -> int:
        return self.params.num_seqs * self.params.length

    def _q(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return torch.softmax(logits.float(), -1)
        return probabilities(logits, self.sampling)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        depth = min(max_depth, self.params.length, self.runner.context - len(history))
        if depth < 1:
            return DraftTree()
        k = self.params.num_seqs
        rows = [self.runner.catch_up(history)] * k  # each sequence's draft logits so far
        prefixes: list[tuple[int, ...]] = [()] * k
        tokens, parents, qs = [], [], []
        for level in range(depth):
            by_prefix: dict[tuple, torch.Tensor] = {}
            for i in range(k):  # one q per distinct prefix: its draws are then i.i.d.
                if prefixes[i] not in by_prefix:
                    by_prefix[prefixes[i]] = self._q(rows[i])
            for i in range(k):
                q = by_prefix[prefixes[i]]
                token = int(sample(q, self.generator))
                parents.append(-1 if level == 0 else len(tokens) - k)
                tokens.append(token)
                qs.append(q)
                prefixes[i] += (token,)
            if level + 1 < depth:
                logits = self.runner.extend(DraftTree(tokens, parents))
                rows = list(logits)
        self.runner.rewind()
        return DraftTree(tokens, parents, None if self.sampling.greedy else torch.stack(qs),
                         kseq=True)
