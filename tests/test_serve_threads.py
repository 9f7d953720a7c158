"""serve/threads.py: torch's threads in a worker thread, and the main thread's OpenMP pool."""

from __future__ import annotations

import os
import threading

import pytest
import torch


def _in_fresh_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=fn()))
    thread.start()
    thread.join()
    return box["value"]


def test_prepare_worker_thread_applies_the_count():
    from tokenlean.serve.threads import prepare_worker_thread

    before = torch.get_num_threads()  # 1 here (conftest)
    try:
        for n in (2, 1, 3):
            returned, seen = _in_fresh_thread(lambda n=n: (prepare_worker_thread(n),
                                                           torch.get_num_threads()))
            assert returned == seen == n
        # None keeps what torch.set_num_threads set last
        assert _in_fresh_thread(lambda: prepare_worker_thread(None)) == 3
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_release_thread_pool_frees_the_callers_pool():
    from tokenlean.serve.threads import _openmp_runtime, release_thread_pool

    if _openmp_runtime() is None:
        pytest.skip("torch runs no OpenMP runtime with omp_pause_resource_all here")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = torch.randn(512, 512)
        (x @ x + 1).sum()  # parallel ops: this thread's pool now holds a helper thread
        with_pool = _threads()
        assert release_thread_pool()
        assert _threads() == with_pool - 1  # the helper is gone (joined)
        (x @ x + 1).sum()  # and the next parallel op simply builds a new pool
        assert _threads() == with_pool
    finally:
        torch.set_num_threads(before)
