"""A draft model run beside the target: its own KV cache kept in step with the output, and
its logits over a draft tree grown level by level (what the drafters built on a small
model share: draft, rsd, dyspec, spectr, online, and rasd with a model)."""

from __future__ import annotations

import torch

from tokenlean.errors import UserError
from tokenlean.model.load import load_model
from tokenlean.sampling import SamplingParams
from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.zoo.resolve import resolve_model


def load_draft(lm, name: str, trainable: bool = False):
    """The draft model `name` on the target's device and dtype; it must share the vocabulary.
    `trainable`: plain weights that autograd can update (not prepacked for oneDNN on CPU)."""
    _, folder = resolve_model(name)
    draft = load_model(folder, device=str(lm.model.device), dtype=lm.model.dtype,
                       pack=not trainable)
    if draft.config.vocab_size != lm.model.config.vocab_size:
        raise UserError(f"draft model {name!r} has vocabulary {draft.config.vocab_size}, the "
                        f"target {lm.model.config.vocab_size}: they must share a tokenizer")
    return draft


class DraftRunner:
    """One sequence's draft cache. `catch_up(history)` brings it to the history and returns
    the draft's logits after it; `extend(tree)` feeds the tree's nodes not fed yet (the
    earlier ones were fed by the previous calls since the catch-up), each attending to the
    history and its own ancestors only, and returns their logits."""

    def __init__(self, model, tree_nodes: int):
        self.model = model
        # slots: the longest history, then a whole tree of tree_nodes
        self.cache = model.new_cache(model.config.max_position_embeddings + tree_nodes)
        self.cached: list[int] = []  # tokens whose keys/values are in the cache
        self.fed = 0  # tree nodes in the cache after the history

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    @torch.inference_mode()
    def catch_up(self, history: list[int]) -> torch.Tensor:
        common = 0
        for a, b in zip(self.cached, history[:-1]):  # the last token is fed again: its logits
            if a != b:
                break
            common += 1
        self.cache.truncate(common)
        fresh = torch.tensor([history[common:]], device=self.model.device)
        self.cached, self.fed = list(history), 0
        return self.model(fresh, cache=self.cache, last_n=1)[0, -1]

    @torch.inference_mode()
    def extend(self, tree: DraftTree) -> torch.Tensor:
        """(N - fed, V) draft logits at the tree's nodes fed..N-1 (`fed` before the call)."""
        first = self.fed
        n, new = len(self.cached), len(tree) - first
        ancestors = tree.ancestor_mask(self.model.device)[first + 1 :, 1:]  # (new, N)
        mask = torch.cat((ancestors.new_ones(new, n), ancestors), dim=1)  # history + nodes
        positions = torch.tensor([n - 1 + d for d in tree.depths[first:]], device=self.model.device)
        tokens = torch.tensor([tree.tokens[first:]], device=self.model.device)
        logits = self.model(tokens, positions=positions, cache=self.cache, mask=mask)[0]
        self.fed = len(tree)
        return logits

    def rewind(self) -> None:
        """Drop the tree's nodes from the cache (the history stays)."""
        self.cache.truncate(len(self.cached))
        self.fed = 0


class DraftModelDrafter(Drafter):
    """What the drafters built on a draft model share: the draft (`params.model`) loaded
    beside the target, and per request the sampling parameters, a generator of its own
    (seeded from the request's seed + 1, so drafts never consume the target's random
    stream) and a draft cache of its own (sessions share the weights, never the cache)."""

    needs_draft_model = True
    trainable: bool = False  # the draft's weights are updated while serving (online)
    unseeded: int | None = None  # the generator's seed when the request has none

    def __init__(self, lm, params):
        super().__init__(lm, params)
        self.draft = load_draft(lm, params.model, self.trainable)
        self.sampling = SamplingParams()

    def start(self, history: list[int], sampling: SamplingParams) -> None:
        self.sampling = sampling
        seed = self.unseeded if sampling.seed is None else sampling.seed + 1
        self.generator = SamplingParams(seed=seed).generator(self.draft.device)
        self.runner = DraftRunner(self.draft, self.max_nodes)
