"""Sample shards on disk: ``--batch-size`` samples of one arm per ``.npz`` file, written atomically, so a
rerun of the same command resumes (shards already written are not sampled again). Under torchrun, task
``t`` (an (arm, shard) pair, in a fixed order) goes to rank ``t mod world``.

Every ``.npz`` the evaluation writes (shards and feature caches) carries a *record* of what it belongs
to: its ``kind``, the run's ``config_digest``, its sample ``indices`` and, for an arm's files, the
``arm`` key and ``arm_spec``. A file that cannot be read, or whose record differs from the one it is read
for (e.g. a shard of another arm copied in its place), is ignored with a warning and made again."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arms import Arm
from ..files import write_atomic
from .distributed import Dist
from .sampler import Sampler

__all__ = [
    "ShardStore",
    "arm_spec_json",
    "make_record",
    "read_checked",
    "record_mismatch",
    "sample_tasks",
    "samples_digest",
    "save_npz",
    "shard_path",
    "shard_ranges",
    "warn",
]


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr (shown even with ``--quiet``)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def arm_spec_json(arm: Arm) -> str:
    """The sampling fields of ``arm`` (canonical form, no display name) as sorted JSON."""
    spec = {k: v for k, v in asdict(arm.canonical()).items() if k != "name"}
    return json.dumps(spec, sort_keys=True)


def samples_digest(images: np.ndarray) -> str:
    """sha256 (16 hex digits) of an image array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def make_record(
    kind: str, *, config_digest: str, indices: Iterable[int], arm: Arm | None = None, **extra: str
) -> dict[str, np.ndarray]:
    """The record of a file: ``kind``, ``config_digest``, ``arm`` and ``arm_spec`` (when ``arm`` is
    given), ``extra`` strings and the sample ``indices`` (int64)."""
    rec = {"kind": np.asarray(kind), "config_digest": np.asarray(config_digest)}
    if arm is not None:
        rec["arm"] = np.asarray(arm.key)
        rec["arm_spec"] = np.asarray(arm_spec_json(arm))
    rec.update({k: np.asarray(v) for k, v in extra.items()})
    rec["indices"] = np.asarray(list(indices), dtype=np.int64)
    return rec


def _show(v: np.ndarray) -> str:
    if v.ndim == 0:
        text = repr(v.item())
        return text if len(text) <= 80 else text[:77] + "..."
    if v.size == 0:
        return "[]"
    return f"[{v.flat[0]}..{v.flat[-1]}] ({v.size} values)"


def record_mismatch(data: dict[str, np.ndarray], record: dict[str, np.ndarray]) -> str | None:
    """Why ``data`` does not carry ``record`` (None when it does)."""
    for k, want in record.items():
        if k not in data:
            return f"records no {k} (an older attnguide wrote it, or not the evaluation)"
        try:
            same = np.array_equal(data[k], want)
        except Exception:  # incomparable types
            same = False
        if not same:
            return f"records {k} {_show(data[k])}, not {_show(want)}"
    return None


def read_checked(path: Path, record: dict[str, np.ndarray], redo: str) -> dict[str, np.ndarray] | None:
    """The arrays of the ``.npz`` at ``path``, or None if it is missing, unreadable or does not carry
    ``record`` (then a warning naming the file and ``redo``, what happens instead)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # truncated, not a zip, pickled objects, ...
        warn(f"cannot read {path} ({type(err).__name__}: {err}); {redo}")
        return None
    why = record_mismatch(data, record)
    if why is not None:
        warn(f"{path} does not belong here: it {why}; {redo}")
        return None
    return data


@dataclass(frozen=True)
class ShardStore:
    """The shards of one run: folder, each shard's sample indices and the run's config digest."""

    root: Path
    ranges: tuple[range, ...]
    config_digest: str

    def path(self, arm: Arm, j: int) -> Path:
        return shard_path(self.root, arm, j)

    def record(self, arm: Arm, j: int) -> dict[str, np.ndarray]:
        """What shard ``j`` of ``arm`` must record."""
        return make_record("shard", config_digest=self.config_digest, indices=self.ranges[j], arm=arm)

    def read(self, arm: Arm, j: int) -> dict[str, np.ndarray] | None:
        """Shard ``j`` of ``arm``, or None (missing, damaged, or of another arm / run / samples)."""
        data = read_checked(self.path(arm, j), self.record(arm, j), "sampling it again")
        if data is not None and not {"images", "mask_fraction", "seconds"} <= set(data):
            warn(f"{self.path(arm, j)} lacks images, mask_fraction or seconds; sampling it again")
            return None
        return data

    def write(self, arm: Arm, j: int, images: np.ndarray, mask_fraction: Any, seconds: float) -> Path:
        """Write shard ``j`` of ``arm`` with its record; returns its path."""
        path = self.path(arm, j)
        rec = self.record(arm, j)
        save_npz(path, images=images, mask_fraction=mask_fraction, seconds=np.float64(seconds), **rec)
        return path

    def load_arm(self, arm: Arm) -> dict[str, np.ndarray]:
        """All shards of ``arm`` joined: ``images``, ``mask_fraction``, total sampling ``seconds`` and
        ``digest`` (:func:`samples_digest` of the images); RuntimeError if a shard is missing."""
        parts = []
        for j in range(len(self.ranges)):
            data = self.read(arm, j)
            if data is None:
                raise RuntimeError(f"shard {j} of arm {arm.key} is missing after sampling")
            parts.append(data)
        images = np.concatenate([p["images"] for p in parts])
        return {
            "images": images,
            "mask_fraction": np.concatenate([p["mask_fraction"] for p in parts]),
            "seconds": np.float64(sum(float(p["seconds"]) for p in parts)),
            "digest": np.asarray(samples_digest(images)),
        }


def sample_tasks(
    tasks: Sequence[tuple[Arm, int]],
    sampler: Sampler,
    store: ShardStore,
    dist: Dist,
    log: Callable[[str], None],
) -> list[str]:
    """Sample this rank's share of ``tasks`` (task t goes to rank t mod world) that are not written yet
    (or whose file does not carry its record). Returns the shard paths written."""
    written = []
    mine = [(t, arm, j) for t, (arm, j) in enumerate(tasks) if t % dist.world == dist.rank]
    todo = [(t, arm, j) for t, arm, j in mine if store.read(arm, j) is None]
    if todo:
        log(f"[rank {dist.rank}] sampling {len(todo)} shard(s); {len(mine) - len(todo)} already written")
    for n, (_, arm, j) in enumerate(todo, 1):
        t0 = time.perf_counter()
        images, frac = sampler.sample(arm, store.ranges[j], j)
        seconds = time.perf_counter() - t0
        written.append(str(store.write(arm, j, images, frac, seconds)))
        log(f"[rank {dist.rank}] {n}/{len(todo)} {arm.key} shard {j}: {seconds:.1f} s")
    return written
