"""The tree sizer: the cost model's choice, the rates it is built on, and the measured
pace of drafting and plain steps that decides whether drafting stays on."""

from __future__ import annotations

from tokenlean.engine.tree_sizer import TreeSizer


def test_tree_sizer_follows_the_cost_curve():
    def sizer_for(costs):
        sizer = TreeSizer(costs, max_nodes=12)
        for _ in range(TreeSizer.WARMUP_STEPS):
            sizer.record(12, [0, 1])  # the first two nodes are accepted, the rest never
        return sizer

    def nodes(sizer, batch):
        sizer.calls = 1  # not an exploration step
        return sizer.nodes(batch)

    flat = sizer_for({s: 1.0 for s in (1, 4, 16, 64)})  # GPU-like: 64 tokens cost one step
    assert nodes(flat, 1) == nodes(flat, 16) == 2  # nodes never accepted are not worth it
    steep = sizer_for({1: 1.0, 4: 4.0, 16: 16.0, 64: 64.0})  # every token costs a step
    assert nodes(steep, 1) == nodes(steep, 16) == 0
    knee = sizer_for({1: 1.0, 8: 1.1, 16: 1.3, 64: 13.0})  # cheap until the device is full
    assert nodes(knee, 1) == 2 and nodes(knee, 32) == 0
    warming = TreeSizer({1: 1.0, 64: 64.0}, max_nodes=12)
    assert warming.nodes(32) == 12  # full trees until the rates are measured
    # a batch that does not draft explores nothing; its probe steps draft, alone
    for _ in range(3 * TreeSizer.EXPLORE):
        n = steep.nodes(16)
        probing = steep.calls % TreeSizer.PROBE == 0  # nothing measured: every PROBE-th
        assert (n > 0) == probing  # a probe drafts now and then (the measured pace)
        assert steep.explorer(16) is None
    # a drafting batch: every EXPLORE-th step one sequence, in turn, drafts a full tree,
    # never on a probe step (its time must be the probed way's alone)
    explorers = []
    for _ in range(6 * TreeSizer.EXPLORE):
        n = flat.nodes(16)
        probing = flat.calls % TreeSizer.PROBE == 0
        assert (n == 0) == probing
        explorers.append(flat.explorer(16))
        assert explorers[-1] is None or not probing
    chosen = [e for e in explorers if e is not None]
    assert len(chosen) == 3 and len(set(chosen)) == 3 and all(0 <= e < 16 for e in chosen)


def test_tree_sizer_weighs_the_drafters_own_time():
    """A drafter whose own CPU time per step exceeds what its accepted tokens save is
    switched off; a cheap one keeps drafting (GPU-like flat forward costs)."""
    flat = {s: 1.0 for s in (1, 4, 16, 64)}

    def size(draft_s):
        sizer = TreeSizer(flat, max_nodes=12)
        for _ in range(TreeSizer.WARMUP_STEPS):
            sizer.record(12, [0, 1], draft_s)  # 3 tokens per step when drafting
        sizer.calls = 1
        return sizer.nodes(1)

    assert size(0.0) == size(0.5) == 2  # 3 tokens per 1.5 s beats 1 per 1 s
    assert size(3.0) == 0  # 3 tokens per 4 s: plain decoding is faster


def test_rates_count_the_steps_that_allowed_a_node():
    """Deep nodes exist mostly when the drafter found a long match, which is accepted: a
    rate over the steps that had node i made 12-node caps look worth 12 tokens a step.
    The expected gain under a cap must equal what the recorded steps really gained."""
    sizer = TreeSizer({1: 1.0, 64: 8.0}, max_nodes=12)
    steps = [(2, [0])] * 28 + [(12, list(range(12)))] * 4  # rarely long, then all accepted
    for tree_len, accepted in steps:
        sizer.record(tree_len, accepted)
    expected = sizer.expected()
    for cap in (1, 2, 5, 12):
        gained = sum(1 + min(len(a), cap) for _, a in steps) / len(steps)
        drafted = sum(min(n, cap) for n, _ in steps) / len(steps)
        assert abs(expected[cap][0] - gained) < 1e-9, (cap, expected[cap], gained)
        assert abs(expected[cap][1] - drafted) < 1e-9
    # a step drafted under a smaller cap says nothing of the nodes the cap left out
    sizer.record(3, [0, 1, 2], cap=3)
    assert sizer.allowed[3] == 32 and sizer.allowed[2] == 33


def _past_warmup(costs) -> TreeSizer:
    sizer = TreeSizer(costs, max_nodes=12)
    for _ in range(TreeSizer.WARMUP_STEPS):
        sizer.record(12, [0, 1])
    return sizer


def _nodes(sizer: TreeSizer, batch: int, periods: int = 1) -> list[int]:
    """The sizes chosen over `periods` PROBE periods, exploration and probe steps included."""
    return [sizer.nodes(batch) for _ in range(periods * TreeSizer.PROBE)]


def test_measured_pace_switches_drafting_off_when_the_model_is_wrong():
    """The model says draft (flat costs), but this batch size measured drafting steps at
    half plain decoding's tokens per second: drafting goes off, except a probe step that
    keeps the figure current, spaced by how much longer a drafting step took (twice: one
    probe in two periods). Another batch size, unmeasured, follows the model."""
    sizer = _past_warmup({s: 1.0 for s in (1, 4, 16, 64)})
    assert _nodes(sizer, 4).count(2) == TreeSizer.PROBE - 1  # one probe runs plain
    for _ in range(TreeSizer.MIN_PACE):
        sizer.record_step(4, True, seconds=0.4, tokens=4)  # 10 tokens/s drafting
        sizer.record_step(4, False, seconds=0.2, tokens=4)  # 20 tokens/s plain
    chosen = _nodes(sizer, 4, periods=4)
    assert chosen.count(2) == 2 and chosen.count(0) == 4 * TreeSizer.PROBE - 2
    assert _nodes(sizer, 8).count(2) == TreeSizer.PROBE - 1
    # the workload changes: drafting measures faster again and comes back on
    for _ in range(20):
        sizer.record_step(4, True, seconds=0.1, tokens=8)
    assert _nodes(sizer, 4).count(2) == TreeSizer.PROBE - 1


def test_measured_pace_switches_drafting_on_when_the_model_is_too_cautious():
    sizer = _past_warmup({1: 1.0, 4: 4.0, 16: 16.0, 64: 64.0})  # every token costs a step
    assert _nodes(sizer, 2).count(0) == TreeSizer.PROBE - 1
    for _ in range(TreeSizer.MIN_PACE):
        sizer.record_step(2, True, seconds=0.1, tokens=6)
        sizer.record_step(2, False, seconds=0.1, tokens=2)
    assert sum(n > 0 for n in _nodes(sizer, 2)) == TreeSizer.PROBE - 1


def test_a_drafting_probe_is_kept_cheap():
    """A probe that drafts while plain decoding is chosen uses the largest tree whose
    modelled forward costs at most PROBE_COST plain steps, not the model's best size."""
    sizer = TreeSizer({1: 1.0, 16: 1.0, 32: 2.0, 64: 4.0, 512: 32.0}, max_nodes=12)
    for _ in range(TreeSizer.WARMUP_STEPS):
        sizer.record(12, list(range(12)))  # every node accepted: the model wants 12
    for _ in range(TreeSizer.MIN_PACE):  # but measured, drafting loses at 16 sequences
        sizer.record_step(16, True, seconds=1.0, tokens=16)
        sizer.record_step(16, False, seconds=0.1, tokens=16)
    chosen = [n for n in _nodes(sizer, 16, periods=12) if n]
    assert chosen and set(chosen) == {1}  # 16 x 2 tokens cost 2.0 = 2 plain steps; 3 nodes, more
    assert _nodes(sizer, 1).count(12) == TreeSizer.PROBE - 1  # unmeasured: the model's size
