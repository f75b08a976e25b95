"""The results record of an ``attnguide eval`` run (``metrics.json``): how it ran, and each experiment's
rows with their metrics, FID deltas against the paired baseline and notes."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arms import Arm
from .experiments import Entry, blur_kernel_for
from .features import FeatureExtractor
from .scoring import REFERENCE_SOURCE, paired_bootstrap_fid

__all__ = [
    "add_reference",
    "arm_spec",
    "command_line",
    "environment",
    "experiment_notes",
    "experiment_rows",
    "run_record",
]


def command_line(argv: Sequence[str], world: int) -> str:
    """The command that reproduces the run: ``attnguide eval ...``, or its torchrun form for ``world`` > 1."""
    if world > 1:
        head = ["torchrun", f"--nproc_per_node={world}", "-m", "attnguide.apps.eval"]
    else:
        head = ["attnguide", "eval"]
    return shlex.join(head + list(argv))


def environment(device: str, world: int) -> dict[str, Any]:
    """Device, threads, process count and library versions, so figures can be told apart by where they ran."""
    import diffusers

    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "world_size": world,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def run_record(
    args: argparse.Namespace,
    config: dict[str, Any],
    *,
    device: str,
    world: int,
    extractor: FeatureExtractor,
    description: str,
    calibration: dict[str, Any] | None,
    shards_written: int,
) -> dict[str, Any]:
    """The results record before any experiment is scored: command, config, environment, extractor,
    calibration, and the model's training summary when its folder has a ``training.json``."""
    record: dict[str, Any] = {
        "command": command_line(args.argv, world),
        "config": config,
        "environment": environment(device, world),
        "extractor": {"name": extractor.name, "identity": extractor.identity, "description": description},
        "calibration": calibration,
        "experiments": {},
        "shards_written": shards_written,
    }
    training = Path(args.model) / "training.json"
    if training.exists():
        with contextlib.suppress(Exception):
            t = json.loads(training.read_text())
            record["model_training"] = {
                k: t.get(k) for k in ("steps", "final_loss", "wall_time_s", "command")
            }
    return record


def add_reference(record: dict[str, Any], ref: dict[str, np.ndarray] | None, *, inception: bool) -> None:
    """Record the reference set (None: no experiment needed one) and the feature dimensions."""
    if ref is None:
        record["reference"] = {"count": 0, "source": "none"}
        return
    record["reference"] = {"count": len(ref["pool"]), "source": REFERENCE_SOURCE}
    dims = {k: ref[k].shape[1] for k in ("pool", "spatial", "logits") if k in ref}
    record["extractor"]["dims"] = dims
    if not inception:
        record["extractor"]["description"] = (
            f"{dims['pool']}-d pooled features; sFID on the first 7 channels of the 7x7 map "
            f"({dims['spatial']}-d); logits of {dims['logits']} digits"
        )


def arm_spec(arm: Arm) -> dict[str, Any]:
    """The sampling fields of an arm (canonical form; without its display name)."""
    return {k: v for k, v in asdict(arm.canonical()).items() if k != "name"}


def experiment_notes(
    name: str,
    rows: Sequence[Entry],
    *,
    calibration: dict[str, Any] | None,
    conditional_model: bool,
    image_size: int,
) -> list[str]:
    """What a reader of an experiment's table needs to know: arms left out, mask fractions, kernels."""
    notes = []
    if name in ("table1", "cfg") and not conditional_model:
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
    return notes


def experiment_rows(
    rows: Sequence[Entry],
    scores: dict[str, dict[str, Any]],
    features: dict[str, dict[str, np.ndarray]],
    ref_stats: dict[str, Any],
    *,
    num_samples: int,
    bootstrap: int,
    seed: int,
    intervals: dict[tuple[str, str], list[float]],
) -> list[dict[str, Any]]:
    """The rows of one experiment: each arm's scores, and for rows with a baseline the FID delta and its
    paired bootstrap interval (``intervals`` caches them by (arm, baseline) key pair across experiments)."""
    out = []
    labels_to_key = {e.label: e.arm.key for e in rows}
    for e in rows:
        r = {
            "label": e.label,
            "arm": e.arm.key,
            "spec": arm_spec(e.arm),
            "x": e.x if e.x is None or math.isfinite(e.x) else None,
            "baseline": e.baseline,
            "uses_sag": e.arm.uses_sag,
            "num_samples": num_samples,
            **scores[e.arm.key],
        }
        if e.baseline:
            bkey = labels_to_key[e.baseline]
            r["fid_delta"] = r["metrics"]["fid"] - scores[bkey]["metrics"]["fid"]
            pair = (e.arm.key, bkey)
            if pair not in intervals:
                a, b = features[e.arm.key]["pool"], features[bkey]["pool"]
                intervals[pair] = list(paired_bootstrap_fid(a, b, ref_stats["pool"], bootstrap, seed=seed))
            r["fid_delta_ci"] = intervals[pair]
        out.append(r)
    return out
