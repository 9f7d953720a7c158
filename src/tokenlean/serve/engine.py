"""One worker thread owns the model and steps every running request in one batch.

Requests join the running batch between steps (continuous batching, engine/scheduler.py):
each step is one forward over every running sequence, with its own prompt chunk, token
or draft tree. Deltas go back to the request's event loop through
`call_soon_threadsafe` (a thread-safe hand-off into an asyncio.Queue); a cancellation
flag, checked before every step, stops the sequence of a client that went away, and a
per-request deadline (`--request-timeout`, from arrival) stops one that runs too long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tokenlean.engine.scheduler import CacheFull, Scheduler, SchedulerConfig, Sink, Work
from tokenlean.engine.sequence import Sequence
from tokenlean.engine.text import TextStream
from tokenlean.engine.tree_sizer import TreeSizer
from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams
from tokenlean.serve.threads import prepare_worker_thread, release_thread_pool
from tokenlean.spec_decode.budget import forward_costs

log = logging.getLogger("tokenlean.serve")


CANCEL_ALL = "cancel all"  # a marker on the job queue


class QueueFull(Exception):
    pass


class RequestTimeout(Exception):
    """The request ran past the server's --request-timeout; its generation was stopped."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)
    timeout: float | None = None  # seconds from arrival; None = no limit
    logprobs: int | None = None  # None: no logprobs; k: each token's and k alternatives
    prompt_logprobs: bool = False  # the prompt's own logprobs too (echo with logprobs)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.arrival + self.timeout

    def expired(self, now: float | None = None) -> bool:
        deadline = self.deadline
        return deadline is not None and (now or time.perf_counter()) >= deadline

    def timeout_error(self) -> RequestTimeout:
        return RequestTimeout(f"the request did not finish within the server's request "
                              f"timeout ({self.timeout:g} s); its generation was stopped")

    def send(self, kind: str, value) -> None:
        """From the worker thread: ("delta", (text, logprobs or None)) |
        ("prompt", the prompt's logprobs) | ("done", GenerationResult) | ("error", exc)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class ClientGone(Exception):
    """The client went away (or the request was cancelled) before the generation ended."""


class ServerShutdown(Exception):
    """The server stopped before this request finished."""


class JobSink(Sink):
    """A sequence's output, sent to the request's event loop and counted in the metrics."""

    def __init__(self, job: Job, metrics):
        self.job, self.metrics = job, metrics
        self.last: float | None = None  # time of the last delta

    def stop_reason(self) -> str | None:
        if self.job.expired():  # checked first: the app also cancels a job it timed out
            return "timeout"
        return "cancelled" if self.job.cancelled.is_set() else None

    def delta(self, text: str, logprobs: list | None = None) -> None:
        if text:  # latencies count text; logprobs alone (a held-back character) do not
            now = time.perf_counter()
            if self.metrics:
                if self.last is None:
                    self.metrics.ttft.observe(now - self.job.arrival)
                else:
                    self.metrics.itl.observe(now - self.last)
            self.last = now
        self.job.send("delta", (text, logprobs))

    def prompt(self, logprobs: list) -> None:
        self.job.send("prompt", logprobs)

    def done(self, result) -> None:
        if self.metrics:
            self.metrics.observe_result(result, time.perf_counter() - self.job.arrival)
        self.job.send("done", result)

    def stopped(self, reason: str) -> None:
        if reason == "cancelled":
            if self.metrics:
                self.metrics.cancelled.inc()
            self.job.send("error", ClientGone())  # ends a handler still waiting for a result
            return
        self.job.cancel()
        self.job.send("error", self.job.timeout_error() if reason == "timeout"
                      else ServerShutdown(reason))

    def failed(self, error: Exception) -> None:
        self.job.send("error", error)


class Engine:
    def __init__(self, lm, method: str = "greedy", method_args: dict | None = None,
                 kv=None, max_queue: int = 64, metrics=None,
                 config: SchedulerConfig | None = None):
        self.lm, self.method, self.method_args = lm, method, method_args or {}
        self.kv = kv  # a KVConfig: a fresh policy per request
        self.metrics = metrics
        self.config = config or SchedulerConfig()
        self.max_queue = max_queue  # requests waiting for a place in the batch
        # handed to the worker thread: a Job, CANCEL_ALL or None (stop the worker)
        self.jobs: queue.Queue[Job | str | None] = queue.Queue()
        self.scheduler: Scheduler | None = None  # built in the worker thread
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tokenlean-engine", daemon=True)

    def start(self) -> None:
        """Call in the thread that loaded the model: its OpenMP pool is freed so that the
        worker's is the only one (serve/threads.py: else served decoding runs at about
        half the offline speed)."""
        release_thread_pool()
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.jobs.put(None)
        self.thread.join(timeout)

    def cancel_all(self) -> None:
        """From any thread: stop every waiting and running request, each answered with a
        503 server_shutdown error (the end of --shutdown-timeout's grace period)."""
        self.jobs.put(CANCEL_ALL)

    def submit(self, job: Job) -> None:
        if self.waiting >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); "
                            "retry later")
        self.jobs.put_nowait(job)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize() + (len(self.scheduler.waiting) if self.scheduler else 0)

    @property
    def running(self) -> int:
        return len(self.scheduler.running) if self.scheduler else 0

    @property
    def busy(self) -> bool:
        return self.running > 0

    def _run(self) -> None:
        prepare_worker_thread()
        self.drafter = self.lm.drafter(self.method, self.method_args)
        sizer = None
        if self.drafter is not None and self.config.adaptive_trees:
            sizer = TreeSizer(forward_costs(self.lm.model), self.drafter.max_nodes)
        self.scheduler = Scheduler(self.lm.model, self.config, sizer)
        self.ready.set()
        while True:
            for job in self._incoming(block=self.scheduler.idle):
                if job is None or job is CANCEL_ALL:
                    self.scheduler.cancel_all("the server is shutting down")
                    if job is None:
                        return
                else:
                    self._add(job)
            try:
                self.scheduler.step_once()
            except Exception as e:  # a bug must fail its requests, never kill the worker
                log.exception("scheduler step failed")
                self.scheduler.fail_all(e)

    def _incoming(self, block: bool) -> list[Job | None]:
        """New jobs: wait for one when nothing runs, else take what has arrived."""
        jobs = [self.jobs.get()] if block else []
        while True:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _add(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        sink = JobSink(job, self.metrics)
        if job.expired():  # waited in the queue past its deadline
            sink.stopped("timeout")
            return
        lm = self.lm
        try:
            seq = Sequence(lm.model, job.prompt_ids, job.max_tokens, job.sampling,
                           drafter=self.drafter, policy=self.kv.make() if self.kv else None,
                           stop_ids=lm.tokenizer.eos_ids, method=self.method,
                           logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs)
            self.scheduler.add(Work(seq, TextStream(lm.tokenizer, job.stop, seq.stop_ids), sink))
        except (UserError, CacheFull) as e:
            job.send("error", e)
        except Exception as e:  # never let one request kill the worker
            log.exception("could not start a generation")
            job.send("error", e)
