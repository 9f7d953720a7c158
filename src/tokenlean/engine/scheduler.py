"""Continuous batching: waiting and running sequences, one batched step at a time.

Each `step_once`:
1. drops the sequences whose client went away or whose time ran out;
2. admits waiting sequences, oldest first, while the batch and the KV memory budget
   have room (a sequence reserves its whole cache on admission, so a running one never
   runs out; one that could never fit is refused when it is added);
3. shares the step's token budget: every decoding sequence gets its token and its
   draft tree, then prompts are fed in chunks from what is left, shortest first, so a
   long prompt stalls neither the streams that are decoding nor the first token of
   the short prompts that arrive with it;
4. sizes the draft trees for the batch from the device's measured forward costs and
   the acceptance seen so far, and keeps drafting on only while its measured steps
   beat plain decoding's at this batch size (engine/tree_sizer.py);
5. runs the step and hands each sequence's new tokens to its text stream and sink.

Nothing here knows about HTTP: a `Sink` receives the text, the result or the error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from tokenlean.engine.prefix_cache import PrefixCache
from tokenlean.engine.sequence import Sequence
from tokenlean.engine.step import step
from tokenlean.engine.text import TextStream
from tokenlean.engine.tree_sizer import TreeSizer

log = logging.getLogger("tokenlean.engine")
MIB = 2**20


class CacheFull(Exception):
    """A request needs more KV memory than the server has for all sequences together."""


@dataclass
class SchedulerConfig:
    max_batch: int = 16  # sequences decoded side by side
    max_step_tokens: int = 512  # tokens per forward: decode rows, tree nodes, prompt chunks
    prefill_chunk: int = 256  # most prompt tokens one sequence feeds per step
    kv_memory_mb: float = 4096  # KV cache of all running sequences together
    prefix_cache_mb: float = 512  # 0: no prefix caching
    adaptive_trees: bool = True  # size draft trees for the batch (False: the drafter's own)


class Sink:
    """Where a sequence's output goes. Subclasses override what they need."""

    def stop_reason(self) -> str | None:
        """Non-None (e.g. "cancelled", "timeout") to stop the sequence before the next step."""
        return None

    def delta(self, text: str, logprobs: list | None = None) -> None:
        """New text; with `logprobs` asked for, the TokenLogprobs of the tokens behind it
        (sent even when the text is held back, e.g. a partial character)."""

    def prompt(self, logprobs: list) -> None:
        """The prompt's own TokenLogprobs (when asked for), once its prefill is done."""

    def done(self, result) -> None: ...

    def stopped(self, reason: str) -> None: ...

    def failed(self, error: Exception) -> None: ...


@dataclass
class Work:
    seq: Sequence
    text: TextStream
    sink: Sink
    stored: bool = False  # its prompt went into the prefix cache
    logprobs_sent: int = 0  # seq.logprobs[:logprobs_sent] went out with earlier deltas
    prompt_sent: bool = False  # the prompt's logprobs went out


class Scheduler:
    MIN_CHUNK = 32  # prompt tokens fed per step at least, while any prompt waits

    def __init__(self, model, config: SchedulerConfig | None = None, sizer: TreeSizer | None = None):
        self.model, self.config = model, config or SchedulerConfig()
        self.waiting: deque[Work] = deque()
        self.running: list[Work] = []
        self.prefix = PrefixCache(int(self.config.prefix_cache_mb * MIB))
        self.sizer = sizer
        self.reserved = 0  # KV bytes reserved by running sequences
        self.steps = 0
        self.batch_tokens = 0  # tokens fed over all steps (a mean batch size for /metrics)
        self._sized: tuple[int | None, int | None] = (None, None)  # this step's (nodes, explorer)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, work: Work) -> None:
        need, limit = work.seq.kv_bytes(), int(self.config.kv_memory_mb * MIB)
        if need > limit:
            raise CacheFull(f"the request needs {need / MIB:.1f} MiB of KV cache; the server "
                            f"holds {limit / MIB:.1f} MiB for all requests (--kv-memory-mb)")
        self.waiting.append(work)

    def cancel_all(self, reason: str) -> None:
        """Stop every running and waiting sequence; each sink hears `stopped(reason)`."""
        self._end_all(lambda sink: sink.stopped(reason))

    def fail_all(self, error: Exception) -> None:
        """Fail every running and waiting sequence with `error` (after an internal error)."""
        self._end_all(lambda sink: sink.failed(error))

    def _end_all(self, tell) -> None:
        for work in [*self.running, *self.waiting]:
            try:
                self._end(work)
            except Exception:  # the state may be broken already; the sink must still hear
                log.exception("could not release a sequence")
            tell(work.sink)
        self.running.clear()
        self.waiting.clear()

    def step_once(self) -> None:
        self._drop_stopped()
        self._admit()
        if not self.running:
            return
        batch, chunks = self._plan()
        start = time.perf_counter()
        try:
            new = step(self.model, [w.seq for w in batch], chunks)
        except Exception as e:  # a failed forward fails this batch, not the server
            log.exception("batched step failed")
            for work in batch:
                self._end(work)
                work.sink.failed(e)
            self.running = [w for w in self.running if w not in batch]
            return
        self.steps += 1
        self._time_step(batch, chunks, new, time.perf_counter() - start)
        for work, tokens in zip(batch, new):
            self._deliver(work, tokens)
        self.running = [w for w in self.running if not w.seq.finished]

    # --- the steps of step_once ---------------------------------------------------------------

    def _drop_stopped(self) -> None:
        for queue in (self.running, self.waiting):
            for work in list(queue):
                reason = work.sink.stop_reason()
                if reason:
                    queue.remove(work)
                    self._end(work)
                    work.sink.stopped(reason)

    def _admit(self) -> None:
        limit = int(self.config.kv_memory_mb * MIB)
        while (self.waiting and len(self.running) < self.config.max_batch
               and self.reserved + self.waiting[0].seq.kv_bytes() <= limit):
            work = self.waiting.popleft()
            seq = work.seq
            seq.allocate()
            self.reserved += seq.kv_bytes()
            # a sequence scoring its own prompt (echo with logprobs) must feed all of it
            scores_prompt = seq.prompt_logprobs is not None
            if seq.policy is None and not scores_prompt and self.config.prefix_cache_mb > 0:
                hit = self.prefix.lookup(seq.feed)
                if hit is not None:
                    seq.reuse(*hit)
            self.running.append(work)

    def _plan(self) -> tuple[list[Work], list[int | None]]:
        """Which sequences run this step, and how many prompt tokens each may feed."""
        decoding = [w for w in self.running if not w.seq.prefilling]
        prefilling = [w for w in self.running if w.seq.prefilling]
        nodes = explorer = None
        if self.sizer is not None and self.config.adaptive_trees and decoding:
            nodes = self.sizer.nodes(len(decoding))
            explorer = self.sizer.explorer(len(decoding))
        self._sized = (nodes, explorer)
        used = 0
        for i, work in enumerate(decoding):
            work.seq.max_nodes = cap = self.sizer.max_nodes if i == explorer else nodes
            drafter = work.seq.drafter  # None for a penalized sequence, even with a method
            if drafter is not None:
                used += drafter.max_nodes if cap is None else min(cap, drafter.max_nodes)
            used += 1
        left = max(self.config.max_step_tokens - used, 0)
        batch, chunks = list(decoding), [None] * len(decoding)
        oldest = prefilling[0] if prefilling else None
        short_here = False  # a prompt this step finishes: it chooses its first token
        # Shortest prompt first, and a long one (more than a chunk left) only fills what the
        # short ones leave, or MIN_CHUNK beside them: a 2,000-token prompt then does not hold
        # up the first token of the short requests arriving with it.
        for work in sorted(prefilling, key=lambda w: w.seq.remaining_prompt):
            remaining = work.seq.remaining_prompt
            long_prompt = remaining > self.config.prefill_chunk
            chunk = 0 if long_prompt and short_here else min(self.config.prefill_chunk, left,
                                                               remaining)
            if work is oldest:  # the oldest prompt always moves, however busy the step
                chunk = max(chunk, min(self.MIN_CHUNK, self.config.prefill_chunk, remaining))
            if chunk <= 0:
                continue
            short_here = short_here or chunk >= remaining
            batch.append(work)
            chunks.append(chunk)
            left = max(left - chunk, 0)
        return batch, chunks

    def _time_step(self, batch: list[Work], chunks: list[int | None], new: list[list[int]],
                   seconds: float) -> None:
        """Tell the sizer how fast a pure decoding step ran, drafting or not (steps that
        fed prompt chunks or gave one sequence an exploring full tree would blur it)."""
        nodes, explorer = self._sized
        if nodes is None or explorer is not None or any(c is not None for c in chunks):
            return
        self.sizer.record_step(len(batch), nodes > 0, seconds, sum(map(len, new)))

    def _deliver(self, work: Work, tokens: list[int]) -> None:
        seq = work.seq
        self.batch_tokens += len(tokens)
        if seq.last_tree is not None and self.sizer is not None:
            self.sizer.record(*seq.last_tree)
            seq.last_tree = None
        if not work.stored and not seq.prefilling and seq.policy is None and self.config.prefix_cache_mb > 0:
            self.prefix.store(seq.feed, seq.cache)
            work.stored = True
        if seq.prompt_logprobs is not None and not work.prompt_sent and not seq.prefilling:
            work.sink.prompt(seq.prompt_logprobs)
            work.prompt_sent = True
        if not tokens:
            return
        delta = work.text.push(tokens)
        if work.text.hit:
            seq.stop_early(work.text.unused)
        if seq.logprobs is not None:
            new, work.logprobs_sent = seq.logprobs[work.logprobs_sent:], len(seq.logprobs)
            if delta or new:
                work.sink.delta(delta, new)
        elif delta:
            work.sink.delta(delta)
        if seq.finished:
            tail = work.text.close()
            if work.text.hit:
                seq.finish_reason = "stop"
            if tail:
                work.sink.delta(tail, [] if seq.logprobs is not None else None)
            result = seq.result(work.text.text)
            self._end(work)
            work.sink.done(result)

    def _end(self, work: Work) -> None:
        if work.seq.cache is not None:
            self.reserved -= work.seq.kv_bytes()
        work.seq.close()
