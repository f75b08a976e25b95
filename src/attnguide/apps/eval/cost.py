"""The ``cost`` experiment (paper Table 7): time and peak memory of one batch for each guidance method."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..arms import Arm
from .experiments import COST_METHODS
from .sampler import Sampler

__all__ = ["PeakMemory", "run_cost", "time_batch"]


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` above the start on GPU; on CPU the peak
    resident set size above the start (Linux: ``/proc/self/status`` VmHWM after resetting it through
    ``/proc/self/clear_refs``; elsewhere ``resource.getrusage`` ru_maxrss, which never goes down, so
    only a new process-wide peak shows)."""

    def __init__(self, device: str):
        self.device = device
        self.method = ""
        self.peak_bytes: float = math.nan

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated() minus memory_allocated() at the start"
            return self
        _malloc_trim()
        self._start = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _proc_status("VmRSS")
            self.method = "peak RSS above the start (/proc/self VmHWM, reset via clear_refs)"
        except OSError:
            pass
        if self._start is None:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta (process high-water mark; only a new peak shows)"
            self._rusage = True
        else:
            self._rusage = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = float(torch.cuda.max_memory_allocated() - self._start)
        elif self._rusage:
            self.peak_bytes = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start)
        else:
            hwm = _proc_status("VmHWM")
            self.peak_bytes = float(hwm - self._start) if hwm is not None else math.nan


def time_batch(sampler: Sampler, arm: Arm, batch: int) -> tuple[float, PeakMemory]:
    """Seconds and peak memory of sampling one batch of ``arm``, after a one-step warm-up."""
    sampler.with_steps(1).sample(arm, range(batch), 0)
    cuda = sampler.device.startswith("cuda")
    with PeakMemory(sampler.device) as mem:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.sample(arm, range(batch), 0)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem


def run_cost(
    sampler: Sampler, batch: int, scales: dict[str, float], log: Callable[[str], None]
) -> dict[str, Any]:
    """Time (after a one-step warm-up) and peak memory of one batch for each method in COST_METHODS at
    ``scales`` (keys "sag", "cfg", "pag" and the ROW_TERMS' names; the CFG methods only on a
    class-conditional model). A method whose scale is 0 is left out."""
    rows = []
    method = ""
    for name, make in COST_METHODS.items():
        arm = make(scales)
        if arm.terms == frozenset() and name != "no guidance":
            continue
        if (arm.conditional or arm.cfg_scale is not None) and sampler.num_class_embeds is None:
            continue
        seconds, mem = time_batch(sampler, arm, batch)
        method = mem.method
        mib = mem.peak_bytes / 2**20
        rows.append({"method": name, "arm": arm.key, "seconds": seconds, "peak_memory_mib": mib})
        log(f"cost: {name}: {seconds:.2f} s, peak {mib:.1f} MiB")
    base = rows[0]["seconds"] if rows else math.nan
    for r in rows:
        r["time_vs_no_guidance"] = r["seconds"] / base
    return {"batch": batch, "steps": sampler.steps, "memory_method": method, "rows": rows}
