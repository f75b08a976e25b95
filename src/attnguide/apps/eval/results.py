"""The results record of an ``attnguide eval`` run (``metrics.json``): how it ran, what the reference is
(and whether it was held out for the model and the extractors), each experiment's rows with their
metrics and notes, its paired comparisons (every two entries, every metric of :data:`STAT_METRICS`: delta,
bootstrap interval, Bonferroni-widened interval, seed-block deltas, verdict), and how a second feature
extractor ranks the same arms."""

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
from .metrics import bonferroni_z, kendall_tau, normal_p_value
from .scoring import BETTER, STAT_METRICS

__all__ = [
    "ALPHA",
    "add_reference",
    "arm_spec",
    "command_line",
    "compare_arms",
    "correct_comparisons",
    "environment",
    "experiment_comparisons",
    "experiment_notes",
    "experiment_pairs",
    "experiment_rows",
    "extractor_agreement",
    "held_out_status",
    "run_record",
]

#: The family-wise error rate of the corrected intervals (over every comparison of the run).
ALPHA = 0.05


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
    second: FeatureExtractor | None = None,
) -> dict[str, Any]:
    """The results record before any experiment is scored: command, config, environment, extractor (and
    the second one), calibration, and the model's training summary when its folder has a
    ``training.json`` (with the digits it trained on, ``data_split``)."""
    record: dict[str, Any] = {
        "command": command_line(args.argv, world),
        "config": config,
        "environment": environment(device, world),
        "extractor": {"name": extractor.name, "identity": extractor.identity, "description": description},
        "second_extractor": None,
        "calibration": calibration,
        "experiments": {},
        "shards_written": shards_written,
    }
    if second is not None:
        record["second_extractor"] = {"name": second.name, "identity": second.identity}
    t = _read_json(Path(args.model) / "training.json")
    if t is not None:
        keys = ("steps", "final_loss", "wall_time_s", "command", "num_images", "data_split")
        record["model_training"] = {k: t.get(k) for k in keys}
    return record


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is none (or it is not readable JSON)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    return None


def held_out_status(training: dict[str, Any] | None, reference: dict[str, Any], who: str) -> dict[str, Any]:
    """Whether the reference digits were held out for ``who`` (the model, or an extractor), from its
    training record (``training.json`` / a classifier's ``config.json``): only when it records that it
    trained on the train part of THIS split (same split name, train-index and data digests) and the
    reference is the held-out part. ``{"held_out": bool, "why": str}``."""
    part = reference.get("part")
    if part != "held-out":
        why = f"the reference is the {part!r} part of the digits, which {who} may have trained on"
        return {"held_out": False, "why": why}
    if training is None:
        return {"held_out": False, "why": f"{who} has no training record: what it trained on is unknown"}
    split = training.get("data_split")
    if not isinstance(split, dict):
        n = training.get("num_images") or training.get("train_size")
        total = reference.get("total", 5000)  # the reference data set's images (older records: MNIST)
        seen = "every reference digit among them" if n == total else "which may include reference digits"
        why = (
            f"{who}'s training record names no split of the digits: it trained on {n or 'an unknown number'}"
            f" of the {total} {reference.get('source', 'MNIST')} digits, {seen} (until it is retrained with "
            "`attnguide train`, which trains on the train part)"
        )
        return {"held_out": False, "why": why}
    if split.get("part") != "train":
        return {
            "held_out": False,
            "why": f"{who} trained on all the digits (data part {split.get('part')!r})",
        }
    same = (
        split.get("name") == reference.get("split")
        and split.get("train_digest") == reference.get("split_train_digest")
        and split.get("data_digest") == reference.get("data_digest")
    )
    if not same:
        return {"held_out": False, "why": f"{who} trained on the train part of another split or data set"}
    why = f"{who} trained on the train part of {split['name']} only (train digest {split['train_digest']})"
    return {"held_out": True, "why": why}


def _extractor_status(extractor: FeatureExtractor, reference: dict[str, Any]) -> dict[str, Any]:
    """:func:`held_out_status` of a feature extractor (Inception-v3 never saw MNIST)."""
    if extractor.name.startswith("inception"):
        return {"held_out": True, "why": "Inception-v3 was trained on ImageNet, not on these digits"}
    folder = getattr(extractor, "folder", None)
    training = _read_json(Path(folder) / "config.json") if folder is not None else None
    return held_out_status(training, reference, "this extractor")


def add_reference(
    record: dict[str, Any],
    ref: dict[str, np.ndarray] | None,
    *,
    inception: bool,
    reference: dict[str, Any] | None = None,
    model: str | None = None,
    extractors: Sequence[FeatureExtractor] = (),
) -> None:
    """Record the reference set (None: no experiment needed one), the feature dimensions, and whether
    the reference (``reference``: :func:`attnguide.apps.eval.scoring.reference_record`) was held out for
    the model in folder ``model`` and for each of ``extractors``."""
    if ref is None:
        record["reference"] = {"count": 0, "source": "none"}
        return
    record["reference"] = {**(reference or {}), "count": len(ref["pool"])}
    if reference is not None:
        training = _read_json(Path(model) / "training.json") if model is not None else None
        record["reference"]["held_out_for_model"] = held_out_status(training, reference, "the model")
        record["reference"]["held_out_for_extractors"] = {
            e.identity: _extractor_status(e, reference) for e in extractors
        }
    dims = {k: ref[k].shape[1] for k in ("pool", "spatial", "logits") if k in ref}
    record["extractor"]["dims"] = dims
    if not inception:
        record["extractor"]["description"] = (
            f"{dims['pool']}-d pooled features; sFID on the first 7 channels of the 7x7 map "
            f"({dims['spatial']}-d); logits of {dims['logits']} classes"
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


def experiment_pairs(rows: Sequence[Entry]) -> list[tuple[Entry, Entry]]:
    """Every two entries of an experiment with different arms, once: first each entry against its
    baseline, then the others as (later row, earlier row). The report states all of their deltas."""
    by_label = {e.label: e for e in rows}
    pairs: list[tuple[Entry, Entry]] = []
    seen: set[frozenset[str]] = set()

    def add(a: Entry, b: Entry) -> None:
        key = frozenset((a.arm.key, b.arm.key))
        if a.arm.key != b.arm.key and key not in seen:
            seen.add(key)
            pairs.append((a, b))

    for e in rows:
        if e.baseline:
            add(e, by_label[e.baseline])
    for i, b in enumerate(rows):
        for a in rows[i + 1 :]:
            add(a, b)
    return pairs


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def compare_arms(
    a: str, b: str, scores: dict[str, dict[str, Any]], stats: dict[str, dict[str, dict[str, np.ndarray]]]
) -> dict[str, dict[str, Any]]:
    """The paired comparison of arm ``a`` with arm ``b`` (keys) on each metric both have: ``delta``
    (a - b, full sets), the bootstrap standard error ``se`` and 95 % percentile interval ``ci95`` of the
    paired resamples, the two-sided ``p`` (normal approximation), the per-seed-block deltas, their mean
    and sd, and ``blocks_agree`` (every block's delta has the sign of ``delta``, which is not 0).
    :func:`correct_comparisons` adds the corrected interval and the verdict."""
    out: dict[str, dict[str, Any]] = {}
    for metric in STAT_METRICS:
        va, vb = scores[a]["metrics"].get(metric), scores[b]["metrics"].get(metric)
        if not (_finite(va) and _finite(vb)):
            continue
        delta = float(va - vb)
        boot = stats[a]["bootstrap"][metric] - stats[b]["bootstrap"][metric]
        boot = boot[np.isfinite(boot)]
        se, ci95 = math.nan, [math.nan, math.nan]
        if len(boot) >= 2:
            se = float(np.std(boot, ddof=1))
            ci95 = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
        blocks = stats[a]["blocks"][metric] - stats[b]["blocks"][metric]
        out[metric] = {
            "delta": delta,
            "se": se,
            "ci95": ci95,
            "p": normal_p_value(delta, se),
            "blocks": [float(v) for v in blocks],
            "block_mean": float(np.mean(blocks)),
            "block_sd": float(np.std(blocks, ddof=1)) if len(blocks) > 1 else math.nan,
            "blocks_agree": bool(delta != 0 and np.all(np.sign(blocks) == np.sign(delta))),
        }
    return out


def experiment_comparisons(
    rows: Sequence[Entry],
    scores: dict[str, dict[str, Any]],
    stats: dict[str, dict[str, dict[str, np.ndarray]]],
    cache: dict[tuple[str, str], dict[str, dict[str, Any]]],
) -> list[dict[str, Any]]:
    """The comparisons of :func:`experiment_pairs`: labels, arm keys and :func:`compare_arms` per metric
    (``cache``, by arm-key pair, shares one comparison between the experiments that state it)."""
    out = []
    for a, b in experiment_pairs(rows):
        pair = (a.arm.key, b.arm.key)
        if pair not in cache:
            cache[pair] = compare_arms(*pair, scores, stats)
        out.append({"a": a.label, "b": b.label, "arm_a": pair[0], "arm_b": pair[1], "metrics": cache[pair]})
    return out


def experiment_rows(
    rows: Sequence[Entry],
    scores: dict[str, dict[str, Any]],
    comparisons: Sequence[dict[str, Any]],
    *,
    num_samples: int,
) -> list[dict[str, Any]]:
    """The rows of one experiment: each arm's scores and, for rows with a baseline, the comparison with
    it (``vs_baseline``, from ``comparisons``) and its FID delta with the 95 % percentile interval
    (``fid_delta``, ``fid_delta_ci``; :func:`correct_comparisons` adds the corrected interval)."""
    by_pair = {(c["arm_a"], c["arm_b"]): c["metrics"] for c in comparisons}
    labels_to_key = {e.label: e.arm.key for e in rows}
    out = []
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
            r["vs_baseline"] = by_pair.get((e.arm.key, bkey), {})
            r["fid_delta_ci"] = r["vs_baseline"].get("fid", {}).get("ci95", [math.nan, math.nan])
        out.append(r)
    return out


def _verdict(metric: str, c: dict[str, Any]) -> str:
    """The verdict of a comparison: "better" / "worse" (for arm a) when the corrected interval excludes 0
    and the blocks agree, else "not resolved"."""
    lo, hi = c["ci_corrected"]
    if not (_finite(lo) and _finite(hi)) or not (lo > 0 or hi < 0) or not c["blocks_agree"]:
        return "not resolved"
    lower = c["delta"] < 0
    return "better" if lower == (BETTER[metric] == "lower") else "worse"


def correct_comparisons(results: dict[str, Any], alpha: float = ALPHA) -> dict[str, Any]:
    """Correct every comparison of the run for their number (Bonferroni): with m the distinct (arm pair,
    metric) comparisons that have a bootstrap interval, each gets ``ci_corrected`` = delta +- z se with
    z = z_(1 - alpha / 2m), ``p_adjusted`` = min(1, m p) and its ``verdict``; rows get
    ``fid_delta_ci_corrected`` and ``verdict``. Returns (and stores as ``results["statistics"]``) the
    description of the method."""
    family = {
        (frozenset((c["arm_a"], c["arm_b"])), metric)
        for block in results["experiments"].values()
        for c in block.get("comparisons", [])
        for metric, v in c["metrics"].items()
        if _finite(v["se"])
    }
    m = max(1, len(family))
    z = bonferroni_z(alpha, m)
    for block in results["experiments"].values():
        for c in block.get("comparisons", []):
            for metric, v in c["metrics"].items():
                ok = _finite(v["se"])
                v["ci_corrected"] = (
                    [v["delta"] - z * v["se"], v["delta"] + z * v["se"]] if ok else [math.nan] * 2
                )
                v["p_adjusted"] = min(1.0, v["p"] * m) if _finite(v["p"]) else math.nan
                v["verdict"] = _verdict(metric, v)
        for r in block["rows"]:
            fid = r.get("vs_baseline", {}).get("fid")
            if fid is not None:
                r["fid_delta_ci_corrected"] = fid["ci_corrected"]
                r["verdict"] = fid["verdict"]
    config = results.get("config", {})
    statistics = {
        "alpha": alpha,
        "comparisons": len(family),
        "z": z,
        "bootstrap": config.get("bootstrap"),
        "seed_blocks": config.get("seed_blocks"),
        "correction": f"Bonferroni over the {len(family)} (arm pair, metric) comparisons of the run: "
        f"delta +- {z:.3f} bootstrap se, p_adjusted = min(1, {len(family)} p)",
        "rule": "a difference is a finding only where the corrected interval excludes 0 and every seed "
        "block's delta has its sign; otherwise it is not resolved",
    }
    results["statistics"] = {**results.get("statistics", {}), **statistics}
    return results["statistics"]


def extractor_agreement(
    results: dict[str, Any], second: dict[str, dict[str, Any]], identity: str
) -> dict[str, Any]:
    """How the second extractor's metrics (``second``: arm key -> {"metrics": ...}) rank the same arms:
    Kendall tau of each metric's per-arm values against the first extractor's, per experiment and over
    every arm; and for every comparison and metric the second extractor's delta and whether its sign is
    the same (``second_delta``, ``same_sign`` in the comparison). Stored as ``results["agreement"]``."""
    first = {r["arm"]: r["metrics"] for block in results["experiments"].values() for r in block["rows"]}

    def taus(keys: Sequence[str]) -> dict[str, float]:
        return {
            m: kendall_tau([first[k].get(m) for k in keys], [second[k]["metrics"].get(m) for k in keys])
            for m in STAT_METRICS
        }

    per_experiment = {
        name: {"arms": len(block["rows"]), "kendall_tau": taus([r["arm"] for r in block["rows"]])}
        for name, block in results["experiments"].items()
    }
    stated = same = resolved = resolved_same = 0
    flips = []
    for name, block in results["experiments"].items():
        for c in block.get("comparisons", []):
            for metric, v in c["metrics"].items():
                sa, sb = (second[k]["metrics"].get(metric) for k in (c["arm_a"], c["arm_b"]))
                d2 = float(sa - sb) if _finite(sa) and _finite(sb) else math.nan
                v["second_delta"] = d2
                v["same_sign"] = bool(_finite(d2) and np.sign(d2) == np.sign(v["delta"]))
                stated, same = stated + 1, same + v["same_sign"]
                if v.get("verdict") in ("better", "worse"):
                    resolved, resolved_same = resolved + 1, resolved_same + v["same_sign"]
                    if not v["same_sign"]:
                        flips.append(f"{name}: '{c['a']}' vs '{c['b']}' {metric}")
    agreement = {
        "second_extractor": identity,
        "experiments": per_experiment,
        "all_arms": {"arms": len(first), "kendall_tau": taus(list(first))},
        "deltas": {
            "stated": stated,
            "same_sign": same,
            "findings": resolved,
            "findings_same_sign": resolved_same,
        },
        "findings_with_other_sign": flips,
    }
    results["agreement"] = agreement
    return agreement
