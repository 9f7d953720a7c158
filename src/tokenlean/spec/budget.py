"""Size draft trees for the device: measure what scoring T tokens costs the target.

On a GPU, scoring 80 tree tokens costs about as much as scoring one; on a CPU
it costs several single-token forwards. The best tree maximises expected
tokens per step divided by the measured cost of a step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

SIZES = (1, 4, 8, 12, 16, 20, 24, 32, 48, 64, 80)
_cost_cache: dict[tuple, dict[int, float]] = {}


@torch.inference_mode()
def forward_costs(model, sizes=SIZES, cached: int = 512, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one forward of T new tokens over `cached` slots, for each T."""
    key = (id(model), tuple(sizes), cached, torch.get_num_threads())
    if key in _cost_cache:
        return _cost_cache[key]
    cache = model.new_cache(cached + max(sizes))
    model(torch.zeros(1, cached, dtype=torch.long, device=model.device), cache=cache)
    costs = {}
    for size in sizes:
        tokens = torch.zeros(1, size, dtype=torch.long, device=model.device)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            cache.truncate(cached)
            start = time.perf_counter()
            model(tokens, cache=cache)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        costs[size] = sorted(times[1:])[len(times[1:]) // 2]
    _cost_cache[key] = costs
    return costs


def best_size(costs: dict[int, float], expected_tokens: Callable[[int], float]) -> int:
    """The number of tree nodes n maximising expected_tokens(n) / cost of scoring n + 1 tokens."""
    candidates = [s - 1 for s in costs if s > 1]
    return max(candidates, key=lambda n: expected_tokens(n) / costs[n + 1])
