"""Prompt lookup decoding: draft the tokens that followed the last n-gram earlier on.

Saxena, "Prompt Lookup Decoding" (2023), https://github.com/apoorvumang/prompt-lookup-decoding
(the n-gram drafter behind transformers' `prompt_lookup_num_tokens` and vLLM's
`ngram` method). Several matches with different continuations form a tree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.tree import DraftTree


@dataclass
class PLDParams:
    max_ngram: int = 3  # longest suffix n-gram looked up (longer matches are tried first)
    min_ngram: int = 1
    num_draft_tokens: int = 10  # depth of each continuation
    max_matches: int = 4  # distinct continuations merged into the tree

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram="
                             f"{self.min_ngram}, max_ngram={self.max_ngram}")
        if self.num_draft_tokens < 1 or self.max_matches < 1:
            raise ValueError("num_draft_tokens and max_matches must be >= 1")


class PromptLookup(Drafter):
    name = "pld"
    Params = PLDParams
    paper = "Saxena 2023, https://github.com/apoorvumang/prompt-lookup-decoding"
    summary = "n-gram match over prompt + output; several matches form a tree"

    @property
    def max_nodes(self) -> int:
        return self.params.num_draft_tokens * self.params.max_matches

    def start(self, history: list[int], sampling=None) -> None:
        # n -> n-gram -> end positions (index of its last token), in order of appearance
        self.index = {n: defaultdict(list) for n in range(self.params.min_ngram, self.params.max_ngram + 1)}
        self.indexed = 0  # history[:indexed] is in the index

    def _update_index(self, history: list[int]) -> None:
        for end in range(self.indexed, len(history)):
            for n, table in self.index.items():
                if end + 1 >= n:
                    table[tuple(history[end + 1 - n : end + 1])].append(end)
        self.indexed = len(history)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        self._update_index(history)
        p = self.params
        depth = min(p.num_draft_tokens, max_depth)
        last = len(history) - 1
        continuations: list[list[int]] = []
        for n in range(p.max_ngram, p.min_ngram - 1, -1):
            for end in reversed(self.index[n].get(tuple(history[-n:]), ())):
                if end == last:
                    continue
                cont = history[end + 1 : end + 1 + depth]
                if cont and cont not in continuations:
                    continuations.append(cont)
                    if len(continuations) == p.max_matches:
                        return trie(continuations)
        return trie(continuations)


def trie(sequences: list[list[int]]) -> DraftTree:
    """Merge token sequences that share prefixes into one tree (first sequences first)."""
    tokens, parents, child_of = [], [], {}
    for seq in sequences:
        node = -1
        for token in seq:
            key = (node, token)
            if key not in child_of:
                child_of[key] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child_of[key]
    return DraftTree(tokens, parents)
