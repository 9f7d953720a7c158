"""How many draft-tree nodes each sequence of a batch gets this step, down to none.

A cost model proposes the size (`TreeSizer.nodes`); the step times measured in this
batch then decide whether drafting is on at all (`Pace`). The cost model alone
was not enough: its forward costs come from one sequence's forwards, and a batched
step also pays per-sequence attention, tree planning and verification that the
curve does not see. On tl-code at 16 streams hybrid ran at 0.71x plain batching.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pace:
    """Running means of the seconds and new tokens of one kind of step (drafting or not)
    at one batch size; `tokens_per_s` is their ratio."""

    WEIGHT = 0.15  # of the newest step
    seconds: float = 0.0
    tokens: float = 0.0
    steps: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        w = 1.0 if not self.steps else self.WEIGHT
        self.seconds += w * (seconds - self.seconds)
        self.tokens += w * (tokens - self.tokens)
        self.steps += 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class TreeSizer:
    """Draft tree size per sequence for a batch of b decoding sequences.

    The model: the n maximising b * E(n) / (cost(b * (1 + T(n)) + other tokens) + b * d),
    where for tree node i (in tree order) over the steps whose cap let it in,
    E(n) = 1 + sum_{i<n} P(node i accepted) and T(n) = sum_{i<n} P(node i drafted); cost()
    is the forward time measured on this device (spec_decode.budget), extrapolated
    linearly, and d is what speculation costs a sequence per step beyond the forward
    (proposing, verifying, compacting the cache, learning; a running mean).

    Rates are over the steps that allowed node i, not over the steps that had it: deep
    nodes exist mostly when the drafter found a long match, which is usually accepted,
    and counting only those made 20-node trees look worth it for every sequence.

    The measurement: once this batch size has run both ways (`MIN_PACE` steps each),
    drafting stays on only while its measured tokens per second beat plain decoding's.
    Now and then a step runs the other way, so both figures follow the workload: every
    PROBE-th step at this batch size, and a drafting probe as much less often as a
    drafting step measured longer than a plain one (a 16-sequence tree step on tl-code
    took 5x a plain one; probing it every 16th step cost a fifth of the throughput).
    """

    WARMUP_STEPS = 32  # verified trees before the measured rates are trusted
    EXPLORE = 8
    PROBE = 16
    MIN_PACE = 3
    DRAFT_WEIGHT = 0.1  # of the newest step in the running mean of d

    def __init__(self, costs: dict[int, float], max_nodes: int):
        self.sizes = sorted(costs)
        self.costs = [costs[s] for s in self.sizes]
        self.max_nodes = max_nodes
        self.accepted = [0] * max_nodes  # steps whose node i was accepted
        # steps by tree length and by cap (0 .. max_nodes): what `offered` and `allowed`
        # are summed from, so that recording a tree costs no loop over its cap
        self.lengths = [0] * (max_nodes + 1)
        self.caps = [0] * (max_nodes + 1)
        self.steps = self.calls = 0
        self.draft_s = 0.0  # running mean of speculation's own seconds per sequence and step
        self.paces: dict[tuple[int, bool], Pace] = {}  # (batch, drafting) -> Pace
        self.probed: dict[int, int] = {}  # batch size -> the call of its last probe
        self._last = (max_nodes, False)  # the last call's (nodes, whether it probed)

    def record(self, tree_len: int, accepted_nodes: list[int], draft_s: float = 0.0,
               cap: int | None = None) -> None:
        """One sequence's verified tree: `tree_len` nodes under a cap of `cap` (None: the
        drafter's own size), of which `accepted_nodes` were accepted."""
        self.draft_s = draft_s if not self.steps else \
            (1 - self.DRAFT_WEIGHT) * self.draft_s + self.DRAFT_WEIGHT * draft_s
        self.steps += 1
        self.caps[self.max_nodes if cap is None else min(cap, self.max_nodes)] += 1
        self.lengths[min(tree_len, self.max_nodes)] += 1
        for i in accepted_nodes:
            if i < self.max_nodes:
                self.accepted[i] += 1

    @property
    def offered(self) -> list[int]:
        """Steps whose tree had a node i, for each i."""
        return _at_least(self.lengths)

    @property
    def allowed(self) -> list[int]:
        """Steps whose cap let a node i in, for each i."""
        return _at_least(self.caps)

    def record_step(self, batch: int, drafting: bool, seconds: float, tokens: int) -> None:
        """A decoding step of `batch` sequences took `seconds` and gave `tokens` new tokens."""
        self.paces.setdefault((batch, drafting), Pace()).add(seconds, tokens)

    def cost(self, tokens: float) -> float:
        sizes, costs = self.sizes, self.costs
        if tokens <= sizes[0]:
            return costs[0]
        for (s0, c0), (s1, c1) in zip(zip(sizes, costs), zip(sizes[1:], costs[1:])):
            if tokens <= s1:
                return c0 + (c1 - c0) * (tokens - s0) / (s1 - s0)
        slope = (costs[-1] - costs[-2]) / (sizes[-1] - sizes[-2])
        return costs[-1] + slope * (tokens - sizes[-1])

    def explorer(self, batch: int) -> int | None:
        """Which of the batch's sequences drafts a full tree this step (every EXPLORE-th
        step, in turn), so that the rates of nodes the chosen size leaves out keep being
        measured (Token Recycling's matrix improves as it serves). One sequence, not all:
        full trees for a whole large batch would cost several steps. Call after `nodes`.
        None while the batch is not drafting (its probes measure drafting; a full tree
        beside 16 plain rows cost SmolLM2 about 5 % of its throughput) and on a probe
        step (whose time must be the probed way's alone)."""
        nodes, probing = self._last
        if self.calls % self.EXPLORE or not nodes or probing:
            return None
        return (self.calls // self.EXPLORE) % batch

    def nodes(self, batch: int, other_tokens: int = 0) -> int:
        self.calls += 1
        if self.steps < self.WARMUP_STEPS:  # full trees until the rates are measured
            self._last = (self.max_nodes, False)
            return self.max_nodes
        expected = self.expected()
        best, best_draft = self._modelled(batch, other_tokens, expected)
        drafting = self._measured(batch)
        if drafting is None:
            drafting = best > 0
        probing = self._probe_due(batch, drafting)
        if probing:  # run the other way now and then
            drafting = not drafting
        n = best_draft if drafting else 0
        if probing and drafting:
            n = self._affordable(batch, best_draft, expected)
        self._last = (n, probing)
        return n

    PROBE_COST = 2.0  # a drafting probe's modelled forward, at most this many plain ones

    def _affordable(self, batch: int, most: int, expected: list[tuple[float, float]]) -> int:
        """The largest tree, at most `most` nodes, whose modelled forward costs at most
        PROBE_COST plain steps: a fresh server's first probes at 16 sequences, with 23-node
        trees, each cost ten plain steps."""
        limit = self.PROBE_COST * self.cost(batch)
        n = 1
        while n < most and self.cost(batch * (1 + expected[n + 1][1])) <= limit:
            n += 1
        return n

    def _probe_due(self, batch: int, drafting: bool) -> bool:
        interval = self.PROBE
        on, off = self._paces(batch)
        if not drafting and on is not None and off is not None and off.seconds > 0:
            interval = round(self.PROBE * max(1.0, on.seconds / off.seconds))
        if self.calls - self.probed.get(batch, 0) < interval:
            return False
        self.probed[batch] = self.calls
        return True

    def expected(self) -> list[tuple[float, float]]:
        """[(E(n), T(n)) for n = 0 .. max_nodes]: the tokens a sequence gains per step and
        the draft nodes it puts into the forward, under a cap of n nodes."""
        out = [(1.0, 0.0)]
        for accepted, offered, allowed in zip(self.accepted, self.offered, self.allowed):
            e, t = out[-1]
            out.append((e + accepted / allowed, t + offered / allowed) if allowed else (e, t))
        return out

    def _modelled(self, batch: int, other_tokens: int,
                  expected: list[tuple[float, float]]) -> tuple[int, int]:
        """(the modelled best size, 0 included; the best size above 0), from `expected()`."""
        plain = batch / self.cost(batch + other_tokens)
        best_draft, best_rate = 0, 0.0
        for n, (gained, drafted) in enumerate(expected[1:], start=1):
            rate = batch * gained / (self.cost(batch * (1 + drafted) + other_tokens)
                                       + batch * self.draft_s)
            if rate > best_rate:
                best_draft, best_rate = n, rate
        return (best_draft if best_rate > plain else 0), best_draft

    def _measured(self, batch: int) -> bool | None:
        """Whether drafting ran faster than plain decoding at this batch size; None until
        both have run MIN_PACE steps."""
        on, off = self._paces(batch)
        if on is None or off is None or min(on.steps, off.steps) < self.MIN_PACE:
            return None
        return on.tokens_per_s > off.tokens_per_s

    def _paces(self, batch: int) -> tuple[Pace | None, Pace | None]:
        """(drafting, plain) paces measured at this batch size."""
        return self.paces.get((batch, True)), self.paces.get((batch, False))


def _at_least(counts: list[int]) -> list[int]:
    """[number of steps with a value > i for i in 0 .. len(counts) - 2], from the counts of
    steps by value."""
    out, above = [], sum(counts)
    for count in counts[:-1]:
        above -= count
        out.append(above)
    return out
