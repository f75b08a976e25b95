"""Shared fixtures: tiny offline Stable Diffusion components and quiet pipelines."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

# Passive OpenMP waits, set before torch starts its thread pool: threads that spin while the machine's
# other core is busy (a background job, a second test process) make tiny models many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

# One thread: the tiny models of the tests gain nothing from a second one, and lose much when it waits.
torch.set_num_threads(int(os.environ.get("ATTNGUIDE_TEST_THREADS", "1")))


def quiet(pipe):
    """Disable the progress bar of a pipeline and return it."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    yield
    dlog.set_verbosity(level)


def in_threads(fn: Callable, jobs_per_thread: list[list]) -> list[list]:
    """Run ``fn(*job)`` for each thread's jobs, the threads started together; errors re-raised here."""
    results: list[list] = [[] for _ in jobs_per_thread]
    errors: list = []
    start = threading.Barrier(len(jobs_per_thread))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = [fn(*job) for job in jobs_per_thread[i]]
        except BaseException as err:  # reported below, in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs_per_thread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results
