"""The batching engine: sequences stepped side by side give what each gives alone.

Invariants: every greedy output in a batch equals offline generation (any method, any
arrival order, chunked prompts, prefix-cache hits); a seeded sampled output does not
depend on who else is in the batch; speculative sampling stays lossless in a batch;
memory admission, chunked prefill and tree sizing behave as documented.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from conftest import TRAIN_TEXT
from tokenlean.engine.scheduler import CacheFull, Scheduler, SchedulerConfig, Sink, Work
from tokenlean.engine.sequence import Sequence
from tokenlean.engine.text import TextStream
from tokenlean.engine.tree_sizer import TreeSizer
from tokenlean.lm import LM
from tokenlean.model.transformer import Segment
from tokenlean.sampling import SamplingParams
from tokenlean.spec_decode.registry import DRAFTERS

METHODS = ["greedy", *sorted(DRAFTERS)]


class Collect(Sink):
    def __init__(self):
        self.deltas, self.result, self.reason = [], None, None
        self.logprob_deltas = []

    def delta(self, text, logprobs=None):
        self.deltas.append(text)
        if logprobs is not None:
            self.logprob_deltas.append(logprobs)

    def done(self, result):
        self.result = result

    def stopped(self, reason):
        self.reason = reason

    def failed(self, error):
        raise error


def fresh(lm: LM) -> LM:
    return LM(lm.name, lm.folder, lm.model, lm.tokenizer)


def work(lm, prompt, n, sampling=None, stop=(), drafter=None, method="greedy"):
    ids = lm.encode(prompt)
    seq = Sequence(lm.model, ids, n, sampling or SamplingParams(), drafter=drafter,
                   stop_ids=lm.tokenizer.eos_ids, method=method)
    return Work(seq, TextStream(lm.tokenizer, stop, seq.stop_ids), Collect())


def run(scheduler, works, arrive_at=None):
    """Add works[i] before step arrive_at[i] (all at once by default); step until idle."""
    arrive_at = arrive_at or [0] * len(works)
    pending = sorted(zip(arrive_at, range(len(works))))
    step = 0
    while pending or not scheduler.idle:
        while pending and pending[0][0] <= step:
            scheduler.add(works[pending.pop(0)[1]])
        scheduler.step_once()
        step += 1
    return [w.sink for w in works]


def prompts(lm) -> list[str | list[int]]:
    """Code the tokenizer knows, and the model's own continuation shown once then its start
    again (a draft that is right: drafters get something accepted)."""
    rng = random.Random(0)
    texts = [t * rng.randint(1, 3) for t in TRAIN_TEXT]
    for start in ("def f(", "class A", "x = "):
        ids = lm.encode(start)
        texts.append(ids + lm.generate(ids, 12, stop_token_ids=[]).token_ids + ids)
    return texts + ["x = 1\n", "def g(", "for k in items:\n    total += k\n" * 2]


@pytest.mark.parametrize("method", METHODS)
def test_batched_greedy_equals_offline(tiny_lm, tiny_draft_dir, method):
    args = {"model": str(tiny_draft_dir)} if method in DRAFTERS and \
        DRAFTERS[method].needs_draft_model else None
    lm = fresh(tiny_lm)
    texts = prompts(lm)
    lengths = [3, 17, 40, 1, 25, 9, 33, 12, 6, 20, 28, 14, 19]
    expected = [fresh(tiny_lm).generate(t, n, method=method, method_args=args)
                for t, n in zip(texts, lengths)]
    drafter = lm.drafter(method, args)
    scheduler = Scheduler(lm.model, SchedulerConfig(max_batch=5, prefill_chunk=7,
                                                    max_step_tokens=40))
    works = [work(lm, t, n, drafter=drafter, method=method) for t, n in zip(texts, lengths)]
    sinks = run(scheduler, works, arrive_at=[0, 0, 1, 2, 2, 5, 8, 8, 9, 15, 30, 31, 40])
    for want, sink, text in zip(expected, sinks, texts):
        got = sink.result
        assert (got.token_ids, got.text, got.finish_reason) == \
            (want.token_ids, want.text, want.finish_reason), text
        assert "".join(sink.deltas) == want.text
    assert scheduler.reserved == 0 and scheduler.idle
    if method != "greedy":  # not vacuous: trees were drafted (and, model-free, accepted)
        assert sum(s.result.stats["drafted_tokens"] for s in sinks) > 0
        if not DRAFTERS[method].needs_draft_model:  # the tiny random draft is nearly always wrong
            assert sum(s.result.stats["accepted_tokens"] for s in sinks) > 0


def test_batched_stop_strings_and_tokens_equal_offline(tiny_lm):
    lm = fresh(tiny_lm)
    base = [lm.generate(t, 24, stop_token_ids=[]) for t in prompts(lm)[:6]]
    cases = []
    for t, full in zip(prompts(lm), base):
        stop = full.text[len(full.text) // 2 :][:3]
        if stop.strip():
            cases.append((t, [stop]))
    assert len(cases) >= 3
    scheduler = Scheduler(lm.model, SchedulerConfig(prefill_chunk=5))
    works = [work(lm, t, 24, stop=stop) for t, stop in cases]
    for w in works:
        w.seq.stop_ids = set()
        w.text.stop_ids = set()
    sinks = run(scheduler, works)
    for (t, stop), sink in zip(cases, sinks):
        want = lm.generate(t, 24, stop=stop, stop_token_ids=[])
        assert (sink.result.token_ids, sink.result.text, sink.result.finish_reason) == \
            (want.token_ids, want.text, "stop")


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_lm):
    lm = fresh(tiny_lm)
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=1234)
    alone = run(Scheduler(lm.model), [work(lm, "def f(x):", 30, sampled)])[0].result
    offline = lm.generate("def f(x):", 30, sampled)
    assert alone.token_ids == offline.token_ids
    others = [work(lm, t, 20, SamplingParams(temperature=1.0, seed=i) if i % 2 else None)
              for i, t in enumerate(prompts(lm)[:7])]
    mixed = [others[0], others[1], work(lm, "def f(x):", 30, sampled), *others[2:]]
    sinks = run(Scheduler(lm.model, SchedulerConfig(prefill_chunk=3)), mixed,
                arrive_at=[0, 0, 2, 3, 3, 4, 6, 9])
    assert sinks[2].result.token_ids == offline.token_ids


def test_packed_forward_equals_separate_forwards(tiny_lm):
    model = tiny_lm.model
    rng = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9]
    caches, segments, expected = [], [], []
    for i, n in enumerate(lengths):
        prefix = torch.randint(0, 100, (1, 4 + i), generator=rng)
        new = torch.randint(0, 100, (1, n), generator=rng)
        alone, packed = model.new_cache(40), model.new_cache(40)
        for cache in (alone, packed):
            model(prefix, cache=cache)
        expected.append(model(new, cache=alone)[0])
        segments.append(Segment(new[0], torch.arange(4 + i, 4 + i + n), packed, logits_for=None))
        caches.append((alone, packed))
    got = model.forward_packed(segments)
    for want, logits, (alone, packed) in zip(expected, got, caches):
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert packed.seen == alone.seen and packed.length == alone.length


def test_prefix_cache_hits_and_outputs_stay_exact(tiny_lm):
    lm = fresh(tiny_lm)
    system = TRAIN_TEXT[2] * 2  # a shared "system prompt"
    texts = [system + tail for tail in ("x = 1\n", "def g(", "for i in")]
    want = [lm.generate(t, 12) for t in texts]
    scheduler = Scheduler(lm.model, SchedulerConfig(prefill_chunk=8))
    first = run(scheduler, [work(lm, texts[0], 12)])
    rest = run(scheduler, [work(lm, t, 12) for t in texts[1:]])
    assert [s.result.token_ids for s in first + rest] == [w.token_ids for w in want]
    assert scheduler.prefix.misses == 1 and scheduler.prefix.hits == 2
    shared = len(lm.encode(system)) // scheduler.prefix.block * scheduler.prefix.block
    assert scheduler.prefix.reused_tokens >= 2 * (shared - scheduler.prefix.block)


def test_prefix_cache_evicts_under_its_byte_budget(tiny_lm):
    lm = fresh(tiny_lm)
    scheduler = Scheduler(lm.model, SchedulerConfig(prefix_cache_mb=0.02))
    run(scheduler, [work(lm, t * 3, 2) for t in TRAIN_TEXT])
    assert 0 < scheduler.prefix.nbytes <= 0.02 * 2**20
    assert len(scheduler.prefix.entries) < len(TRAIN_TEXT)


def test_kv_memory_admits_what_fits_and_refuses_what_never_can(tiny_lm):
    lm = fresh(tiny_lm)
    works = [work(lm, "def f(x):", 10 + i) for i in range(4)]
    mb = min(w.seq.kv_bytes() for w in works) * 1.5 / 2**20  # room for one at a time
    scheduler = Scheduler(lm.model, SchedulerConfig(kv_memory_mb=mb))
    for w in works:
        scheduler.add(w)
    most = 0
    while not scheduler.idle:
        scheduler.step_once()
        most = max(most, len(scheduler.running))
        assert scheduler.reserved <= mb * 2**20
    assert most == 1 and all(w.sink.result is not None for w in works)
    huge = work(lm, "def f(x):", 100)
    with pytest.raises(CacheFull, match="MiB of KV cache"):
        Scheduler(lm.model, SchedulerConfig(kv_memory_mb=huge.seq.kv_bytes() / 2 / 2**20)).add(huge)


def test_a_long_prompt_is_fed_in_chunks_while_others_decode(tiny_lm):
    lm = fresh(tiny_lm)
    scheduler = Scheduler(lm.model, SchedulerConfig(prefill_chunk=8, max_step_tokens=12))
    short = work(lm, "def f(x):", 30)
    scheduler.add(short)
    scheduler.step_once()  # short is decoding
    long = work(lm, TRAIN_TEXT[2] * 3, 4)
    scheduler.add(long)
    before, steps = len(short.seq.out), 0
    while long.seq.prefilling:
        scheduler.step_once()
        steps += 1
    assert steps >= 3  # the long prompt took several steps ...
    assert len(short.seq.out) - before >= steps - 1  # ... and short decoded through them


def test_a_short_prompt_goes_before_a_long_one(tiny_lm):
    """A step that finishes a short prompt feeds a long one only MIN_CHUNK tokens, so the
    long prompt does not hold up the short one's first token; the outputs stay exact."""
    lm = fresh(tiny_lm)
    scheduler = Scheduler(lm.model, SchedulerConfig(prefill_chunk=40, max_step_tokens=128))
    long = work(lm, TRAIN_TEXT[2] * 3, 4)
    assert long.seq.remaining_prompt > 2 * 40  # still long after its first chunk
    scheduler.add(long)
    scheduler.step_once()  # the long prompt alone: a whole chunk
    assert long.seq.fed == 40
    short = work(lm, "def f(x):", 4)
    scheduler.add(short)
    scheduler._admit()
    batch, chunks = scheduler._plan()
    assert batch == [short, long]  # shortest first
    assert chunks == [short.seq.remaining_prompt, Scheduler.MIN_CHUNK]
    while not scheduler.idle:
        scheduler.step_once()
    for w in (long, short):
        alone = fresh(tiny_lm).generate(w.seq.prompt_ids, 4).token_ids
        assert w.sink.result.token_ids == alone


def test_cancelled_and_timed_out_sequences_leave_the_batch(tiny_lm):
    lm = fresh(tiny_lm)

    class StopAfter(Collect):
        def __init__(self, steps, reason):
            super().__init__()
            self.left, self.why = steps, reason

        def stop_reason(self):
            self.left -= 1
            return self.why if self.left < 0 else None

    scheduler = Scheduler(lm.model)
    works = [work(lm, t, 40) for t in prompts(lm)[:3]]
    works[0].sink, works[1].sink = StopAfter(3, "cancelled"), StopAfter(5, "timeout")
    for w in works:
        w.seq.stop_ids = set()
    sinks = run(scheduler, works)
    assert sinks[0].reason == "cancelled" and sinks[0].result is None
    assert sinks[1].reason == "timeout" and sinks[1].result is None
    assert sinks[2].result.completion_tokens == 40
    assert scheduler.reserved == 0 and all(w.seq.cache is None for w in works)


def test_sequences_report_their_drafters_time(tiny_lm):
    lm = fresh(tiny_lm)
    scheduler = Scheduler(lm.model, sizer=TreeSizer({1: 1.0, 64: 8.0}, 12))
    text = prompts(lm)[0]
    recorded = []
    real = scheduler.sizer.record
    scheduler.sizer.record = lambda *a: (recorded.append(a), real(*a))
    run(scheduler, [work(lm, text, 16, drafter=lm.drafter("pld", None), method="pld")])
    assert recorded and all(len(a) == 4 and a[2] > 0 for a in recorded)


def test_the_sizer_times_only_pure_decoding_steps(tiny_lm):
    """Step times go to the sizer's measured pace only for steps that fed no prompt chunk
    and gave no sequence an exploring full tree, filed under drafting or not as the
    step's size was; the outputs stay offline's."""
    lm = fresh(tiny_lm)
    drafter = lm.drafter("pld", None)
    sizer = TreeSizer({1: 1.0, 64: 8.0}, drafter.max_nodes)
    scheduler = Scheduler(lm.model, sizer=sizer)
    timed, plans = [], []
    real_record, real_plan = sizer.record_step, scheduler._plan

    def plan():
        batch, chunks = real_plan()
        plans.append((scheduler._sized, [w.seq.prefilling for w in batch], chunks))
        return batch, chunks

    sizer.record_step = lambda *a: (timed.append((len(plans), *a)), real_record(*a))
    scheduler._plan = plan
    texts = prompts(lm)[:3]
    works = [work(lm, t, 24, drafter=drafter, method="pld") for t in texts]
    run(scheduler, works, arrive_at=[0, 3, 6])
    assert timed
    for step, batch, drafting, seconds, tokens in timed:
        (nodes, explorer), prefilling, chunks = plans[step - 1]
        assert not any(prefilling) and all(c is None for c in chunks) and explorer is None
        assert batch == len(chunks) and drafting == (nodes > 0) and seconds > 0
        assert tokens >= batch
    assert len(timed) < len(plans)  # the prefill and exploring steps were left out
    for w, text in zip(works, texts):
        assert w.sink.result.token_ids == fresh(tiny_lm).generate(text, 24).token_ids


def test_interleaved_generations_do_not_share_drafter_state(tiny_lm):
    """Two prompt-lookup generations interleaved on one LM: each takes the steps and
    accepts the tokens it takes alone (the lookup index is per sequence)."""
    lm = fresh(tiny_lm)
    a_text, b_text = TRAIN_TEXT[2] * 2, TRAIN_TEXT[3] * 2
    alone = [lm.generate(t, 30, method="pld") for t in (a_text, b_text)]
    ga, gb = lm.stream(a_text, 30, method="pld"), lm.stream(b_text, 30, method="pld")
    ia, ib = iter(ga), iter(gb)
    live = [ia, ib]
    while live:
        for it in list(live):
            if next(it, None) is None:
                live.remove(it)
    for want, got in zip(alone, (ga.result, gb.result)):
        assert got.token_ids == want.token_ids
        assert got.stats["steps"] == want.stats["steps"]
        assert got.stats["accepted_tokens"] == want.stats["accepted_tokens"]


def test_closing_a_generation_early_still_saves_the_recycling_matrix(tiny_lm, tmp_path):
    lm = fresh(tiny_lm)
    path = tmp_path / "matrix.npy"
    generation = lm.stream(TRAIN_TEXT[2] * 2, 40, method="recycling",
                           method_args={"matrix_path": str(path)}, stop_token_ids=[])
    steps = iter(generation)
    next(steps)
    next(steps)
    steps.close()  # as the server does when a client goes away
    assert path.is_file()


# --- speculative sampling in a batch: still distributed as plain sampling -----------------

BATCH_RUNS = 2000


@pytest.fixture(scope="module")
def tiny8_batch(tmp_path_factory):
    from test_verify import StubTokenizer, _save_tiny8
    from tokenlean.model.load import load_model

    folder, draft = tmp_path_factory.mktemp("b8"), tmp_path_factory.mktemp("b8-draft")
    _save_tiny8(folder, seed=1)
    _save_tiny8(draft, seed=2)
    lm = LM("tiny8", folder, load_model(folder, device="cpu", dtype="fp32"), StubTokenizer())
    start = [1, 2, 3]
    return lm, start + lm.generate(start, 6).token_ids + start, draft


@pytest.mark.parametrize("method", ["greedy", "pld", "draft"])
def test_sampling_in_a_batch_is_distributed_as_plain_sampling(tiny8_batch, method):
    from test_verify import exact_first3, frequencies, tv, tv_bound

    base, prompt, draft = tiny8_batch
    lm = fresh(base)
    params = SamplingParams(1.0)
    args = {"model": str(draft)} if method == "draft" else None
    drafter = lm.drafter(method, args)
    exact = exact_first3(lm.model, prompt, params)
    counts, drafted, accepted = Counter(), 0, 0
    batch = 16
    for first_seed in range(0, BATCH_RUNS, batch):
        scheduler = Scheduler(lm.model, SchedulerConfig(prefill_chunk=5))
        works = []
        for seed in range(first_seed, first_seed + batch):
            seq = Sequence(lm.model, prompt, 4, SamplingParams(1.0, seed=seed),
                           drafter=drafter, method=method)
            works.append(Work(seq, TextStream(lm.tokenizer, (), ()), Collect()))
        for w in run(scheduler, works, arrive_at=[i % 3 for i in range(batch)]):
            counts[tuple(w.result.token_ids[:3])] += 1
            drafted += w.result.stats.get("drafted_tokens", 0)
            accepted += w.result.stats.get("accepted_tokens", 0)
    if method != "greedy":
        assert 0 < accepted < drafted, (accepted, drafted)
    dist, bound = tv(exact, frequencies(counts, BATCH_RUNS)), tv_bound(exact, BATCH_RUNS)
    assert bound < 0.12
    assert dist < bound, f"TV {dist:.4f} >= bound {bound:.4f}"


def test_a_penalized_sequence_beside_drafted_ones_with_sized_trees(tiny_lm):
    """A penalized sequence has no drafter even on a speculative server; the tree sizer's
    step plan must count it as one plain token (it read the missing drafter's size)."""
    lm = fresh(tiny_lm)
    drafter = lm.drafter("pld")
    sizer = TreeSizer({1: 1.0, 64: 8.0}, drafter.max_nodes)
    scheduler = Scheduler(lm.model, SchedulerConfig(), sizer)
    penalized = SamplingParams(temperature=0, frequency_penalty=1.0)
    works = [work(lm, "def f(x):", 8, drafter=drafter, method="pld"),
             work(lm, "def add(a, b):", 8, sampling=penalized, drafter=drafter, method="pld")]
    assert works[1].seq.drafter is None
    for w in works:
        scheduler.add(w)
    while not scheduler.idle:
        scheduler.step_once()
    assert works[0].sink.result.token_ids == fresh(tiny_lm).generate("def f(x):", 8).token_ids
    alone = fresh(tiny_lm).generate("def add(a, b):", 8, sampling=penalized)
    assert works[1].sink.result.token_ids == alone.token_ids
