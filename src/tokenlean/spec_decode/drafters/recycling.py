"""Token Recycling: reuse the candidates the target already computed.

Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large
Language Models with Token Recycling", arXiv 2408.08696.

An adjacency matrix M (vocab x k) holds, for each token, the target's top-k
next tokens last seen after it. A static tree template is filled level by
level: node (i) is the root's i-th candidate, node (i, j) that token's j-th
candidate, and so on. After every verification forward, the row of every
token in the tree (accepted or not) is overwritten with the top-k of the
target's logits at its position. The matrix is never reset between requests
("hot start"), and it starts warm (spec_decode/warm_start.py): from a matrix shipped
beside a zoo model or built once for any other, then from what the model learned in
earlier processes, saved when a request ends (finished or cancelled): at once the first
time, then at most every SAVE_EVERY_S seconds (a busy server would otherwise rewrite the
whole matrix after every request), and at interpreter exit if a save is still owed.
"""

from __future__ import annotations

import atexit
import heapq
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenlean.errors import UserError
from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.tree import DraftTree

# Prior weight of the r-th candidate, roughly how often rank r is the accepted one.
RANK_WEIGHTS = (0.55, 0.17, 0.08, 0.05, 0.04, 0.03, 0.025, 0.02)
WARM_MODES = ("auto", "base", "cold")
SAVE_EVERY_S = 30.0  # the most often the learned matrix is written


@dataclass
class RecyclingParams:
    num_nodes: int = 0  # tree size; 0 = sized for this device; the paper's template has 80
    max_depth: int = 6
    k: int = 8  # candidates kept per token
    matrix_path: str = ""  # load the matrix from / save it to this file (overrides `warm`)
    warm: str = "auto"  # auto: base + what earlier runs learned, saved; base: the shipped or
    # built matrix, never saved (reproducible timings); cold: empty

    def __post_init__(self):
        if self.warm not in WARM_MODES:
            raise ValueError(f"warm must be one of {', '.join(WARM_MODES)}, got {self.warm!r}")
        if not 1 <= self.k <= len(RANK_WEIGHTS):
            raise ValueError(f"k must be in [1, {len(RANK_WEIGHTS)}]")
        if self.num_nodes < 0 or self.max_depth < 1:
            raise ValueError("num_nodes must be >= 0 (0 = auto) and max_depth >= 1")


def tree_template(num_nodes: int, max_depth: int, k: int) -> list[tuple[int, int]]:
    """(parent, rank) per node, breadth-first: the num_nodes candidate paths with the largest
    product of rank weights (80 nodes, 6 levels, k=8: 8/20/20/19/6/7 nodes per level,
    close to the paper's 8/21/25/15/8/3)."""
    chosen: list[tuple[int, int, int]] = []  # (depth, parent, rank)
    heap = [(-RANK_WEIGHTS[r], 1, -1, r) for r in range(k)]
    while heap and len(chosen) < num_nodes:
        neg_w, depth, parent, rank = heapq.heappop(heap)
        index = len(chosen)
        chosen.append((depth, parent, rank))
        if depth < max_depth:
            for r in range(k):
                heapq.heappush(heap, (neg_w * RANK_WEIGHTS[r], depth + 1, index, r))
    # renumber breadth-first so parents precede children level by level
    order = sorted(range(len(chosen)), key=lambda i: (chosen[i][0], i))
    new_index = {old: new for new, old in enumerate(order)}
    return [(new_index.get(chosen[i][1], -1), chosen[i][2]) for i in order]


def expected_tokens(template: list[tuple[int, int]]) -> float:
    """Tokens per step the template promises under the rank prior: 1 (the bonus) plus, for
    every node, the chance that its whole path is accepted."""
    weights: list[float] = []
    for parent, rank in template:
        weights.append(RANK_WEIGHTS[rank] * (weights[parent] if parent >= 0 else 1.0))
    return 1.0 + sum(weights)


def device_sized_nodes(model, max_depth: int, k: int, extra_nodes: int = 0,
                       extra_tokens: float = 0.0) -> int:
    """Tree size that maximises expected tokens per second on this device, when every
    step also scores `extra_nodes` other draft tokens that add `extra_tokens` per step."""
    from tokenlean.spec_decode.budget import best_size, forward_costs

    costs = {size - extra_nodes: cost for size, cost in forward_costs(model).items()
             if size - extra_nodes > 1}
    if not costs:
        return 1
    return best_size(costs, lambda n: expected_tokens(tree_template(n, max_depth, k)) + extra_tokens)


class TokenRecycling(Drafter):
    name = "recycling"
    Params = RecyclingParams
    paper = "Luo et al., Token Recycling, arXiv 2408.08696"
    summary = "adjacency matrix of the target's past top-k fills a static tree (num_nodes=0: sized for the device; 80: the paper's)"

    def __init__(self, lm, params: RecyclingParams, extra_nodes: int = 0,
                 extra_tokens: float = 0.0):
        super().__init__(lm, params)
        nodes = params.num_nodes or device_sized_nodes(lm.model, params.max_depth, params.k,
                                                       extra_nodes, extra_tokens)
        self.template = tree_template(nodes, params.max_depth, params.k)
        self.matrix = np.full((lm.model.config.vocab_size, params.k), -1, dtype=np.int32)
        self.save_to = self._start_warm(lm, params)  # where end() saves what was learned
        self.saved_at: float | None = None  # time.monotonic() of the last save
        self.owed = False  # learned since the last save, which end() put off
        self.hooked = False  # the exit hook that writes an owed save is registered

    def _start_warm(self, lm, params: RecyclingParams) -> Path | None:
        """Fill the matrix as `matrix_path` and `warm` say; return where to save it."""
        from tokenlean.spec_decode import warm_start

        saved = Path(params.matrix_path) if params.matrix_path else \
            warm_start.learned_path(lm) if params.warm == "auto" else None
        if saved is not None and saved.is_file():
            self.load(saved)
        elif params.warm != "cold":
            base = warm_start.base_matrix(lm, params.k)
            if base is not None:
                self.matrix = base
        return saved

    @property
    def max_nodes(self) -> int:
        return len(self.template)

    def propose(self, history: list[int], max_depth: int) -> DraftTree:
        tokens, parents, depth_of = [], [], []
        placed: list[int] = []  # template node -> tree node (-1: pruned)
        seen: set[tuple[int, int]] = set()  # (tree parent, token): no duplicate siblings
        root = self.root = history[-1]  # observe() refreshes its row too
        for parent, rank in self.template:
            tree_parent = placed[parent] if parent >= 0 else -1
            if parent >= 0 and tree_parent < 0:  # its parent was pruned
                placed.append(-1)
                continue
            source = tokens[tree_parent] if tree_parent >= 0 else root
            depth = depth_of[tree_parent] + 1 if tree_parent >= 0 else 1
            token = int(self.matrix[source, rank])
            if token < 0 or depth > max_depth or (tree_parent, token) in seen:
                placed.append(-1)
                continue
            seen.add((tree_parent, token))
            placed.append(len(tokens))
            tokens.append(token)
            parents.append(tree_parent)
            depth_of.append(depth)
        return DraftTree(tokens, parents)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted) -> None:
        # every scored position refreshes its token's row, accepted or not
        rows = [self.root, *tree.tokens]
        top = logits.topk(self.params.k, dim=-1).indices.to(torch.int32).cpu().numpy()
        self.matrix[np.asarray(rows)] = top

    def info(self) -> dict:
        return {"tree_nodes": len(self.template)}

    def end(self) -> None:
        if self.save_to is None:
            return
        if self.saved_at is not None and time.monotonic() - self.saved_at < SAVE_EVERY_S:
            if not self.hooked:  # what the last requests learned is not lost at exit
                atexit.register(self.flush_owed)
                self.hooked = True
            self.owed = True
            return
        self.flush()

    def flush_owed(self) -> None:
        if self.owed:
            self.flush()

    def flush(self) -> None:
        """Save what was learned now (end() puts saves off to at most one per SAVE_EVERY_S)."""
        if self.save_to is not None:
            self.save(self.save_to)
            self.saved_at, self.owed = time.monotonic(), False

    def save(self, path: str | Path) -> None:
        # through a file object (np.save(path) would append ".npy" to any other name and
        # the next run would start cold), written whole and renamed (no half matrices)
        from tokenlean.spec_decode.warm_start import save_atomic

        save_atomic(Path(path), self.matrix)

    def load(self, path: str | Path) -> None:
        try:
            matrix = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # not a .npy array (a pickle, text, ...)
            raise UserError(f"matrix_path {path}: not a saved Token Recycling matrix ({e})"
                            ) from None
        if not isinstance(matrix, np.ndarray) or matrix.shape != self.matrix.shape \
                or matrix.dtype.kind not in "iu":
            raise UserError(f"matrix_path {path}: an integer matrix of shape "
                            f"{self.matrix.shape} expected, found "
                            f"{getattr(matrix, 'dtype', '?')} {getattr(matrix, 'shape', '?')}")
        self.matrix = matrix.astype(np.int32)
