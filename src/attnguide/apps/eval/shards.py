"""Sample shards on disk: ``--batch-size`` samples of one arm per ``.npz`` file, written atomically, so a
rerun of the same command resumes (shards already written are not sampled again). Under torchrun, task
``t`` (an (arm, shard) pair, in a fixed order) goes to rank ``t mod world``."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..arms import Arm
from ..files import write_atomic
from .distributed import Dist
from .sampler import Sampler

__all__ = ["load_arm_samples", "read_shard", "sample_tasks", "save_npz", "shard_path", "shard_ranges"]


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez(path, **arrays)``, written atomically (readers never see half a file)."""

    def write(p: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        p.write_bytes(buf.getvalue())

    write_atomic(path, write)


def shard_ranges(num_samples: int, batch_size: int) -> list[range]:
    """Sample indices of each shard: [0, B), [B, 2B), ..."""
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def shard_path(shard_dir: Path, arm: Arm, j: int) -> Path:
    """Where shard ``j`` of ``arm`` lives: one folder per arm key."""
    return shard_dir / arm.key / f"shard_{j:05d}.npz"


def read_shard(path: Path, expected: range) -> dict[str, np.ndarray] | None:
    """A written shard's arrays, or None if it is missing or does not hold the expected samples."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # a damaged file: sample it again
        print(f"warning: cannot read {path} ({err}); sampling it again", file=sys.stderr)
        return None
    if list(data.get("indices", [])) != list(expected):
        print(f"warning: {path} holds other samples; sampling it again", file=sys.stderr)
        return None
    return data


def sample_tasks(
    tasks: Sequence[tuple[Arm, int]],
    sampler: Sampler,
    ranges: Sequence[range],
    shard_dir: Path,
    dist: Dist,
    log: Callable[[str], None],
) -> list[str]:
    """Sample this rank's share of ``tasks`` (task t goes to rank t mod world) that are not written yet.
    Returns the shard paths written."""
    written = []
    mine = [(t, arm, j) for t, (arm, j) in enumerate(tasks) if t % dist.world == dist.rank]
    todo = [(t, arm, j) for t, arm, j in mine if read_shard(shard_path(shard_dir, arm, j), ranges[j]) is None]
    if todo:
        log(f"[rank {dist.rank}] sampling {len(todo)} shard(s); {len(mine) - len(todo)} already written")
    for n, (_, arm, j) in enumerate(todo, 1):
        t0 = time.perf_counter()
        images, frac = sampler.sample(arm, ranges[j], j)
        seconds = time.perf_counter() - t0
        path = shard_path(shard_dir, arm, j)
        save_npz(
            path,
            images=images,
            indices=np.asarray(list(ranges[j]), dtype=np.int64),
            mask_fraction=frac,
            seconds=np.float64(seconds),
        )
        written.append(str(path))
        log(f"[rank {dist.rank}] {n}/{len(todo)} {arm.key} shard {j}: {seconds:.1f} s")
    return written


def load_arm_samples(shard_dir: Path, arm: Arm, ranges: Sequence[range]) -> dict[str, np.ndarray]:
    """All shards of ``arm`` joined: ``images``, ``mask_fraction``, total sampling ``seconds`` and the
    shards' ``mtimes`` (which key the cached features); RuntimeError if a shard is missing."""
    parts = []
    for j, r in enumerate(ranges):
        data = read_shard(shard_path(shard_dir, arm, j), r)
        if data is None:
            raise RuntimeError(f"shard {j} of arm {arm.key} is missing after sampling")
        parts.append(data)
    return {
        "images": np.concatenate([p["images"] for p in parts]),
        "mask_fraction": np.concatenate([p["mask_fraction"] for p in parts]),
        "seconds": np.float64(sum(float(p["seconds"]) for p in parts)),
        "mtimes": np.asarray([shard_path(shard_dir, arm, j).stat().st_mtime_ns for j in range(len(ranges))]),
    }
