"""One worker thread owns the model and runs queued requests one at a time.

Plain decoding requests are not batched in this first version: each request
runs alone, so its output is exactly what `tokenlean generate` gives offline.
Deltas go back to the request's event loop through `call_soon_threadsafe`
(a thread-safe hand-off into an asyncio.Queue); a cancellation flag, checked
after every emitted delta, stops the generation of a client that went away, and
a per-request deadline (`--request-timeout`, from arrival) stops one that runs too long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams

log = logging.getLogger("tokenlean.serve")


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
        """From the worker thread: ("delta", str) | ("done", GenerationResult) | ("error", exc)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, lm, method: str = "greedy", method_args: dict | None = None,
                 kv=None, max_queue: int = 64, metrics=None):
        self.lm, self.method, self.method_args = lm, method, method_args or {}
        self.kv = kv  # a KVConfig: a fresh policy per request
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="tokenlean-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.jobs.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.jobs.maxsize} waiting); "
                            "retry later") from None

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            if job.expired():  # waited in the queue past its deadline
                self._timed_out(job)
                continue
            self.busy = True
            try:
                self._generate(job)
            except UserError as e:
                job.send("error", e)
            except Exception as e:  # never let one request kill the worker
                log.exception("generation failed")
                job.send("error", e)
            finally:
                self.busy = False

    def _timed_out(self, job: Job) -> None:
        job.cancel()
        job.send("error", job.timeout_error())  # the app counts it (once) in its metrics

    def _generate(self, job: Job) -> None:
        generation = self.lm.stream(job.prompt_ids, job.max_tokens, job.sampling, stop=job.stop,
                                    method=self.method, method_args=self.method_args,
                                    kv=self.kv)
        steps = iter(generation)
        last = None
        for delta in steps:
            now = time.perf_counter()
            if self.metrics:
                if last is None:
                    self.metrics.ttft.observe(now - job.arrival)
                else:
                    self.metrics.itl.observe(now - last)
            last = now
            job.send("delta", delta)
            if job.expired(now):  # checked first: the app also cancels a job it timed out
                steps.close()
                self._timed_out(job)
                return
            if job.cancelled.is_set():
                steps.close()  # GeneratorExit inside the decode loop: it stops there
                if self.metrics:
                    self.metrics.cancelled.inc()
                return
        result = generation.result
        if self.metrics:
            self.metrics.observe_result(result, time.perf_counter() - job.arrival)
        job.send("done", result)
