"""Size draft trees for the device: measure what scoring T tokens costs the target.

On a GPU, scoring 80 tree tokens costs about as much as scoring one; on a CPU
it costs several single-token forwards. The best tree maximises expected
tokens per step divided by the measured cost of a step.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SIZES = (1, 4, 8, 12, 16, 20, 24, 32, 48, 64, 80)
_cost_cache: dict[tuple, dict[int, float]] = {}


def forward_costs(model, sizes=SIZES, cached: int = 512, rounds: int = 11) -> dict[int, float]:
    """`measure_costs`, kept per model, device and thread count in the state directory: the
    tree sizes chosen from it are then the same in every process (a fresh measurement per
    process picked 3, 7 or 11 nodes over five runs). Delete the file to measure again."""
    key = (id(model), tuple(sizes), cached, torch.get_num_threads())
    if key not in _cost_cache:
        path = _costs_path(model, sizes, cached)
        try:
            costs = {int(k): float(v) for k, v in json.loads(path.read_text())["costs"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            costs = measure_costs(model, sizes, cached, rounds)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"device": _device_name(model), "threads": key[3],
                                        "torch": torch.__version__, "cached": cached,
                                        "costs": costs}, indent=1))
        _cost_cache[key] = costs
    return _cost_cache[key]


def _device_name(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return platform.processor() or platform.machine()


def _costs_path(model, sizes, cached: int) -> Path:
    from tokenlean.spec_decode.warm_start import fingerprint
    from tokenlean.zoo import state_dir

    what = f"{_device_name(model)}|{torch.get_num_threads()}|{torch.__version__}|{model.dtype}|" \
           f"{sizes}|{cached}|{fingerprint(model)}"
    return state_dir() / "costs" / f"{hashlib.sha1(what.encode()).hexdigest()[:16]}.json"


@torch.inference_mode()
def measure_costs(model, sizes=SIZES, cached: int = 512, rounds: int = 11) -> dict[int, float]:
    """Seconds of one forward of T new tokens over `cached` slots, for each T.

    The sizes are timed in interleaved rounds, so that a burst of load from elsewhere
    on the machine lands on all of them alike, and the per-size medians are made
    non-decreasing in T: scoring more tokens never really costs less, and a noisy dip
    would otherwise pick the tree size.
    """
    cache = model.new_cache(cached + max(sizes))
    model(torch.zeros(1, cached, dtype=torch.long, device=model.device), cache=cache)
    sizes = sorted(sizes)
    inputs = {size: torch.zeros(1, size, dtype=torch.long, device=model.device) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for round_ in range(rounds + 1):  # round 0 is a warm-up
        for size in sizes:
            cache.truncate(cached)
            start = time.perf_counter()
            model(inputs[size], cache=cache)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[size].append(time.perf_counter() - start)
    return dict(zip(sizes, non_decreasing([statistics.median(times[s]) for s in sizes])))


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [mean for mean, count in blocks for _ in range(count)]


def best_size(costs: dict[int, float], expected_tokens: Callable[[int], float]) -> int:
    """The number of tree nodes n maximising expected_tokens(n) / cost of scoring n + 1 tokens."""
    candidates = [s - 1 for s in costs if s > 1]
    return max(candidates, key=lambda n: expected_tokens(n) / costs[n + 1])
