"""Torch's CPU threads when the model runs in the server's worker thread, not the main one.

Why served decoding was slower than offline (2 CPUs, 2 torch threads): every thread that
runs a parallel torch op gets its own OpenMP thread pool, kept until that thread exits.
The main thread has one (it loaded the model), the engine thread makes a second. libgomp,
the OpenMP runtime of torch's Linux wheels, lets a waiting pool thread spin 300,000 times
before it sleeps on a futex, but only 100 times while the threads it manages, counted over
every pool of the process, outnumber the CPUs: here 3 > 2. Then the worker's helper thread
falls asleep between any two parallel ops and each op waits for its wake-up: about half
the offline speed on tl-code. Freeing the main thread's pool once the model is loaded
(`release_thread_pool`, called in that thread) brings the count back to 2 and the speed to
offline's. The thread count itself is not the cause: torch applies its set_num_threads
value to a new thread's OpenMP and MKL settings; `prepare_worker_thread` makes it explicit.
"""

from __future__ import annotations

import ctypes
import sys

OMP_PAUSE_SOFT = 1  # omp_pause_resource_kind: free the threads, keep the settings
_RUNTIMES = ("libgomp", "libiomp", "libomp")


def _openmp_runtime():
    """The OpenMP runtime torch loaded (found in the process's memory map), or None."""
    import torch  # noqa: F401 - loads the runtime

    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = [line.split()[-1] for line in maps if "/" in line]
    except OSError:
        return None
    for path in paths:
        if any(name in path.rsplit("/", 1)[-1] for name in _RUNTIMES):
            runtime = ctypes.CDLL(path)  # the library already loaded: the same handle
            if hasattr(runtime, "omp_pause_resource_all"):  # OpenMP 5.0
                return runtime
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP thread pool; call it in the thread that loaded the
    model (the server's main thread) before the worker's first op, so that the worker's
    pool is the only one. A later parallel torch op in the calling thread builds a new pool
    (and the slowdown comes back). True when an OpenMP runtime released it."""
    runtime = _openmp_runtime()
    return runtime is not None and runtime.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


def prepare_worker_thread(num_threads: int | None = None) -> int:
    """At the start of the engine's worker thread: use `num_threads` torch threads in this
    thread (None: what torch.set_num_threads set, or its default) and return the count
    that applies here."""
    import torch

    torch.set_num_threads(num_threads or torch.get_num_threads())
    return torch.get_num_threads()
