"""Compute-matched CFG for ``attnguide eval``: the CFG weight whose update is as strong as a SAG arm's.

SAG adds d = s (ref - degraded) to the model's prediction; CFG at weight w adds (w - w0) (c - u) to the
prediction at weight w0 (w0 = 1, the plain conditional prediction c, for a SAG arm without CFG; its own
CFG weight otherwise). Matching the strength means ||(w - w0) (c - u)|| = ||d||, so

    w_matched = w0 + ratio,   ratio = mean ||d|| / mean ||c - u||

with both means over the calibration samples and every step of the SAG arm's own sampling (the norms are
per sample, over the prediction's channels and pixels). The ratio of the means matches the total update
over a trajectory; a mean of per-step ratios would be dominated by the steps where c - u is tiny (it is
recorded too, as ``mean_of_ratios``). A study of 2026 found most of SAG's gains vanish against CFG
matched this way; the "cfg" experiment's matched rows ask the same of the evaluated model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...engine.layout import LatentLayout
from ...engine.parameterization import scheduler_takes_variance
from ...engine.step import StepOutputs, sample_loop, scheduler_step_kwargs
from ..arms import Arm
from ..images import sample_shape
from .sampler import Sampler

__all__ = ["matched_cfg_weight", "measure_matched_weights", "measure_update_norms", "update_norms"]

#: Significant digits of a measured CFG weight (it names the arm: ``c-cfg1.234``).
WEIGHT_DIGITS = 4


def update_norms(update: Tensor) -> np.ndarray:
    """The L2 norm of each row of ``update`` (B, ...) over all its other dimensions, as float64."""
    return update.detach().double().flatten(1).norm(dim=1).cpu().numpy()


def matched_cfg_weight(
    sag_norms: np.ndarray, cfg_norms: np.ndarray, base_weight: float = 1.0
) -> dict[str, Any]:
    """The CFG weight matching SAG's strength from paired norms ||d_sag|| and ||c - u|| (same samples and
    steps): ``weight`` = ``base_weight`` + mean ||d_sag|| / mean ||c - u||, rounded to
    :data:`WEIGHT_DIGITS` significant digits, with the unrounded ``ratio``, the two means and the mean of
    the per-(sample, step) ratios. ValueError where the shapes differ or c - u is zero everywhere."""
    sag, cfg = np.asarray(sag_norms, dtype=np.float64), np.asarray(cfg_norms, dtype=np.float64)
    if sag.shape != cfg.shape or sag.size == 0:
        raise ValueError(f"`sag_norms` {sag.shape} and `cfg_norms` {cfg.shape} must be paired and non-empty")
    if not (np.isfinite(sag).all() and np.isfinite(cfg).all()):
        raise ValueError("`sag_norms` and `cfg_norms` must be finite")
    if cfg.mean() <= 0:
        raise ValueError("`cfg_norms`: c - u is zero at every step; the model ignores its class label")
    ratio = float(sag.mean() / cfg.mean())
    nonzero = cfg > 0
    return {
        "base_weight": float(base_weight),
        "ratio": ratio,
        "weight": float(f"{base_weight + ratio:.{WEIGHT_DIGITS}g}"),
        "sag_update_norm": float(sag.mean()),
        "cfg_difference_norm": float(cfg.mean()),
        "mean_of_ratios": float((sag[nonzero] / cfg[nonzero]).mean()),
    }


@torch.no_grad()
def measure_update_norms(
    sampler: Sampler, sag_arm: Arm, indices: Sequence[int], shard: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``sag_arm`` on ``indices`` (the seeds and labels of :meth:`Sampler.sample`: noise of seed
    ``seed + i``, label ``i mod 10``) and return, per sample and step, ||d_sag|| and ||c - u||, each
    (len(indices), steps). Without CFG in the arm, u comes from one more pass with the null label (it
    does not change the trajectory); with CFG it is the arm's own unconditional prediction."""
    if sampler.num_class_embeds is None:
        raise ValueError("`sampler`: matching CFG needs a class-conditional model (class embeddings)")
    if not (sag_arm.uses_sag and sag_arm.conditional):
        raise ValueError(f"`sag_arm` must be a class-conditional arm with SAG, got {sag_arm.key}")
    unet, device = sampler.unet, sampler.device
    h, w = sample_shape(unet.config.sample_size)
    gens = [torch.Generator().manual_seed(sampler.seed + i) for i in indices]
    noise = torch.cat([torch.randn((1, unet.config.in_channels, h, w), generator=g) for g in gens])
    real = sampler.num_class_embeds - 1
    labels = {
        "cond": torch.tensor([i % real for i in indices], device=device),
        "uncond": torch.full((len(indices),), sampler.null_label, dtype=torch.long, device=device),
    }

    def model_fn(x: Tensor, t: Tensor, branches: Sequence[str]) -> Tensor:
        return unet(x, t, class_labels=torch.cat([labels[b] for b in branches])).sample

    guider = sampler.guider(sag_arm, shard)
    sched = guider.scheduler
    layout = guider.layout or LatentLayout.from_channels(
        unet.config.in_channels, unet.config.out_channels, variance=scheduler_takes_variance(sched)
    )
    sag_norms, cfg_norms = [], []

    def record(i: int, t: Tensor, latents: Tensor, r: StepOutputs) -> None:
        u = r.out_uncond
        if u is None:  # one more pass with the null label, which does not change the trajectory
            u = layout.split_output(model_fn(r.x_in, t, ["uncond"]))[0]
        cfg_norms.append(update_norms(r.out_cond - u))
        sag_norms.append(update_norms(r.deltas.get("sag", 0 * u)))

    latents = noise.to(device) * sched.init_noise_sigma
    step_kw = scheduler_step_kwargs(sched, gens, 0.0)
    sample_loop(guider, model_fn, latents, extra_step_kwargs=step_kw, callback=record, check_output=False)
    return np.stack(sag_norms, axis=1), np.stack(cfg_norms, axis=1)


def measure_matched_weights(
    sampler: Sampler,
    sag_arms: dict[str, Arm],
    ranges: Sequence[range],
    num_samples: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """For each SAG arm (by key): :func:`matched_cfg_weight` over its first ``num_samples`` samples,
    measured in the batches of the shards ``ranges`` (shard ``j``'s generator, as in sampling), with the
    arm, sample and step counts recorded."""
    out = {}
    for key, arm in sag_arms.items():
        parts = [
            measure_update_norms(sampler, arm, range(r.start, min(r.stop, num_samples)), j)
            for j, r in enumerate(ranges)
            if r.start < num_samples
        ]
        sag = np.concatenate([p[0] for p in parts])
        cfg = np.concatenate([p[1] for p in parts])
        record = matched_cfg_weight(sag, cfg, arm.cfg_scale if arm.cfg_scale is not None else 1.0)
        out[key] = {"sag_arm": key, "samples": int(sag.shape[0]), "steps": int(sag.shape[1]), **record}
        log(
            f"CFG matched to {key}: ||d_sag|| / ||c - u|| = {record['ratio']:.4f} (means over "
            f"{sag.shape[0]} samples x {sag.shape[1]} steps) -> w = {record['weight']:g}"
        )
    return out
