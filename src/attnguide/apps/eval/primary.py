"""``attnguide eval primary``: the pre-registered evaluation of docs/evaluation.md.

The protocol is fixed here, in code, as it is in that document: the arms (:func:`primary_arms`), the ten
primary FID comparisons (:data:`PRIMARY`), the bootstrap that resamples the reference too
(:mod:`.resampling`), Bonferroni over the ten, five seed blocks, the DDIM check. The command's options
choose only where the data and model are, how many samples, and the statistics' sizes.

Arms are sampled shard by shard (every arm's shard j before any arm's shard j + 1), so a run cut short has
every arm at the same smaller n; the shards' record leaves the sample count out of the configuration's
digest, so a later run with a larger ``--num-samples`` extends every arm and reuses what was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...engine.terms import REGISTRY
from ..arms import Arm, method_scale
from ..files import write_json_atomic
from .config import model_digest
from .distributed import Dist
from .experiments import blur_kernel_for
from .metrics import bonferroni_z, gaussian_stats, kendall_tau
from .primary_report import write_primary_outputs
from .resampling import bootstrap_draws, resampled_metrics
from .results import add_reference, environment
from .sampler import Sampler, load_model
from .scoring import (
    ArmResampler,
    arm_features,
    compute_metrics,
    make_extractor,
    make_second_extractor,
    reference_features,
    reference_indices,
    reference_record,
    seed_blocks,
)
from .shards import ShardStore, sample_tasks, shard_ranges

__all__ = ["PRIMARY", "PROTOCOL", "Comparison", "PrimaryRun", "compare", "primary_arms", "sampling_tasks"]

#: The protocol's name and version (docs/evaluation.md); recorded, and part of the shards' digest.
PROTOCOL = "attnguide-primary/1"
#: SAG at the paper's setting: s = 0.1 (its best FID, Fig. 9), sigma 3 (Table 6), the mid block's map.
SAG_SCALE, SAG_SIGMA = 0.1, 3.0
#: CFG's weight, and the sweep of the compute rival (CFG costs 2 passes per step, as SAG).
CFG_WEIGHT, CFG_SWEEP = 1.5, (1.25, 1.5, 2.0, 3.0)
#: The sampler check: the unguided and SAG arms with 50 DDIM steps on the first 1000 seeds.
DDIM_CHECK = {"scheduler": "ddim", "steps": 50, "samples": 1000, "arms": ("u", "u + SAG")}
#: The family-wise error rate over the primary comparisons.
ALPHA = 0.05
#: The other terms of the registry compared with unguided sampling (P7-P10), at the apps' settings.
OTHER_TERMS = ("pag", "seg", "tpg", "slg")


def _cfg_label(w: float) -> str:
    return "CFG" if w == CFG_WEIGHT else f"CFG {w:g}"


def primary_arms(image_size: int) -> dict[str, Arm]:
    """The protocol's arms by label (docs/evaluation.md, "Arms")."""
    sag = {
        "sag_scale": SAG_SCALE,
        "sag_sigma": SAG_SIGMA,
        "sag_kernel": blur_kernel_for(SAG_SIGMA, image_size),
    }
    arms = {
        "u": Arm(),
        "u + SAG": Arm(**sag),
        "c": Arm(conditional=True),
        "c + SAG": Arm(conditional=True, **sag),
        "CFG": Arm(conditional=True, cfg_scale=CFG_WEIGHT),
        "CFG + SAG": Arm(conditional=True, cfg_scale=CFG_WEIGHT, **sag),
        "u + blur": Arm(**sag, sag_mask="global"),
        "u, 2x steps": Arm(steps_multiplier=2),
        **{_cfg_label(w): Arm(conditional=True, cfg_scale=w) for w in CFG_SWEEP},
    }
    terms = {cls.name: cls for cls in REGISTRY}
    for name in OTHER_TERMS:
        window = {f"{name}_window": (0.0, 1.0)} if hasattr(Arm, f"{name}_window") else {}
        arms[f"u + {terms[name].title}"] = Arm(**{f"{name}_scale": method_scale(name)}, **window)
    return {label: arm.canonical() for label, arm in arms.items()}


@dataclass(frozen=True)
class Comparison:
    """A pre-registered comparison: arm ``a`` against arm ``b`` (several: the best of them, chosen inside
    every resample), and the question it answers."""

    id: str
    a: str
    b: tuple[str, ...]
    question: str


PRIMARY = (
    Comparison("P1", "u + SAG", ("u",), "does SAG improve unconditional samples?"),
    Comparison("P2", "c + SAG", ("c",), "does SAG improve conditional samples without CFG?"),
    Comparison("P3", "CFG + SAG", ("CFG",), "does SAG improve samples on top of CFG?"),
    Comparison("P4", "u + SAG", ("u + blur",), "is the attention mask better than blurring everywhere?"),
    Comparison("P5", "u + SAG", ("u, 2x steps",), "is SAG better than its extra passes spent on steps?"),
    Comparison(
        "P6",
        "c + SAG",
        tuple(_cfg_label(w) for w in CFG_SWEEP),
        "is SAG better than CFG at the same cost, at CFG's best weight?",
    ),
    *(
        Comparison(
            f"P{7 + i}", f"u + {t.upper()}", ("u",), f"does {t.upper()} improve unconditional samples?"
        )
        for i, t in enumerate(OTHER_TERMS)
    ),
)
#: Which direction is better for each metric.
BETTER = {"fid": "lower", "sfid": "lower", "is": "higher", "precision": "higher", "recall": "higher"}


def _best(values: Sequence[np.ndarray], metric: str) -> np.ndarray:
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    return stack.min(axis=0) if BETTER[metric] == "lower" else stack.max(axis=0)


def compare(
    c: Comparison,
    metric: str,
    full: Mapping[str, Mapping[str, float]],
    boot: Mapping[str, Mapping[str, np.ndarray]],
    blocks: Mapping[str, Mapping[str, np.ndarray]],
    z: float | None,
) -> dict[str, Any]:
    """Comparison ``c`` on ``metric``: the full-sample delta a - best(b), the bootstrap deltas' se and 95 %
    percentile interval, the per-block deltas, and, with ``z`` (a primary comparison), the corrected
    interval delta +- z se and the verdict ("better" / "worse" for arm a, or "not resolved")."""
    delta = float(full[c.a][metric] - _best([np.asarray(full[b][metric]) for b in c.b], metric))
    d_boot = boot[c.a][metric] - _best([boot[b][metric] for b in c.b], metric)
    d_boot = d_boot[np.isfinite(d_boot)]
    se = float(np.std(d_boot, ddof=1)) if len(d_boot) > 1 else math.nan
    ci95 = [float(v) for v in np.percentile(d_boot, [2.5, 97.5])] if len(d_boot) > 1 else [math.nan] * 2
    d_blocks = blocks[c.a][metric] - _best([blocks[b][metric] for b in c.b], metric)
    out = {"delta": delta, "se": se, "ci95": ci95, "blocks": [float(v) for v in d_blocks]}
    out["blocks_same_sign"] = int(np.sum(np.sign(d_blocks) == np.sign(delta)))
    if z is not None:
        lo, hi = delta - z * se, delta + z * se
        out["ci_corrected"] = [lo, hi]
        resolved = math.isfinite(se) and (lo > 0 or hi < 0)
        better = (delta < 0) == (BETTER[metric] == "lower")
        out["verdict"] = ("better" if better else "worse") if resolved else "not resolved"
    return out


def sampling_tasks(arms: Sequence[Arm], shards: int) -> list[tuple[Arm, int]]:
    """The (arm, shard) tasks shard by shard: every arm's shard j before any arm's shard j + 1."""
    return [(arm, j) for j in range(shards) for arm in arms]


def shard_digest(config: Mapping[str, Any]) -> str:
    """The digest the shards record: the configuration without the sample count and the statistics'
    sizes, so that a run extended to more samples (or scored again) reuses them."""
    kept = {k: v for k, v in config.items() if k not in ("num_samples", "bootstrap", "seed_blocks")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def primary_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``config.json`` of a run: what decides its samples, and the statistics' sizes."""
    model = Path(args.model)
    return {
        "protocol": PROTOCOL,
        "dataset": args.dataset,
        "model": str(model.resolve()) if model.exists() else args.model,
        "model_digest": model_digest(args.model),
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "sampler": args.scheduler,
        "steps": args.steps,
        "bootstrap": args.bootstrap,
        "seed_blocks": args.seed_blocks,
        "resample_reference": True,
        "reference_part": "held-out",
        "alpha": ALPHA,
        "primary_comparisons": len(PRIMARY),
        "ddim_check": {k: list(v) if isinstance(v, tuple) else v for k, v in DDIM_CHECK.items()},
    }


class PrimaryRun:
    """One run of the protocol in one process (one rank of a torchrun launch): :meth:`run` samples this
    rank's shards and, on rank 0, scores the arms and returns the results record."""

    def __init__(self, args: argparse.Namespace, device: str, dist: Dist, log: Callable[[str], None]):
        self.args, self.device, self.dist, self.log = args, device, dist, log
        self.out = Path(args.out)
        self.shard_dir = Path(args.shard_dir) if args.shard_dir else self.out / "shards"
        self.config = primary_config(args)
        self.digest = shard_digest(self.config)
        self.ranges = shard_ranges(args.num_samples, args.batch_size)
        self.store = ShardStore(self.shard_dir, tuple(self.ranges), self.digest)
        n_check = min(DDIM_CHECK["samples"], args.num_samples)
        check_ranges = tuple(r for r in self.ranges if r.start < n_check)
        self.check_store = ShardStore(self.shard_dir / "ddim-check", check_ranges, self.digest + "-ddim")
        self.written: list[str] = []

    def _load(self) -> None:
        unet, sched_config = load_model(self.args.model, self.device)
        self.num_class_embeds = getattr(unet.config, "num_class_embeds", None)
        if self.num_class_embeds is None:
            raise SystemExit(
                "error: --model: the protocol needs a class-conditional model (class embeddings)"
            )
        size = unet.config.sample_size
        self.arms = primary_arms(size if isinstance(size, int) else min(size))
        a = self.args
        self.sampler = Sampler(
            unet, sched_config, a.scheduler, a.steps, a.seed, self.device, self.num_class_embeds
        )
        check = DDIM_CHECK["scheduler"], DDIM_CHECK["steps"]
        self.check_sampler = Sampler(unet, sched_config, *check, a.seed, self.device, self.num_class_embeds)

    def _prepare_folders(self) -> None:
        """Refuse a folder that another protocol, model or sampler wrote (a larger sample count is an
        extension); rank 0 writes this run's ``config.json``."""
        for folder in (self.out, self.shard_dir):
            path = folder / "config.json"
            if path.exists():
                old = json.loads(path.read_text(encoding="utf-8"))
                if shard_digest(old) != self.digest:
                    raise SystemExit(
                        f"error: --out / --shard-dir: {folder} holds a run of another configuration "
                        f"({path}); choose another folder"
                    )
        self.dist.barrier()
        if self.dist.rank == 0:
            for folder in (self.out, self.shard_dir):
                folder.mkdir(parents=True, exist_ok=True)
                write_json_atomic(folder / "config.json", self.config)
        self.dist.barrier()

    def sample(self) -> None:
        """Every arm, shard by shard, then the DDIM check's arms on their seeds."""
        tasks = sampling_tasks(list(self.arms.values()), len(self.ranges))
        self.written += sample_tasks(tasks, self.sampler, self.store, self.dist, self.log)
        self.dist.barrier()
        check = [self.arms[label] for label in DDIM_CHECK["arms"]]
        tasks = sampling_tasks(check, len(self.check_store.ranges))
        self.written += sample_tasks(tasks, self.check_sampler, self.check_store, self.dist, self.log)
        self.dist.barrier()

    def run(self) -> dict[str, Any] | None:
        """Sample, then (rank 0) score and write ``metrics.json`` and ``report.md``."""
        self._prepare_folders()
        self._load()
        self.sample()
        if self.dist.rank != 0:
            return None
        results = self.score()
        write_primary_outputs(results, self.out)
        self.log(f"wrote {self.out / 'report.md'} and metrics.json; {len(self.written)} shard(s) sampled")
        return results

    # ---------------------------------------------------------------------------------------- scoring
    def _scores(
        self, store: ShardStore, arms: Mapping[str, Arm], extractor: Any, ref: dict[str, np.ndarray]
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]]]:
        """Each arm's features (cached beside its shards) and full-sample metrics, mask fraction and
        sampling seconds per sample, by label."""
        ref_stats = {k: gaussian_stats(ref[k]) for k in ("pool", "spatial") if k in ref}
        classes = self.num_class_embeds - 1
        features, scores = {}, {}
        for label, arm in arms.items():
            data = store.load_arm(arm)
            feats = arm_features(store, arm, data, extractor)
            n = len(data["images"])
            labels = np.arange(n) % classes if arm.conditional else None
            frac = data["mask_fraction"]
            features[label] = feats
            scores[label] = {
                "arm": arm.key,
                "metrics": compute_metrics(feats, ref, ref_stats, labels, classes),
                "mask_fraction": float(np.nanmean(frac)) if np.isfinite(frac).any() else None,
                "seconds_per_sample": float(data["seconds"]) / n,
            }
        return features, scores

    def _reference(self, extractor: Any, filename: str) -> dict[str, np.ndarray]:
        a = self.args
        return reference_features(
            self.out,
            extractor,
            None,
            self.log,
            config_digest=self.digest,
            part="held-out",
            filename=filename,
            dataset=a.dataset,
            data_dir=a.data_dir,
        )

    def _block_metrics(
        self, features: Mapping[str, Mapping[str, np.ndarray]], ref: dict[str, np.ndarray]
    ) -> dict[str, dict[str, np.ndarray]]:
        """Each arm's metrics on each seed block, against the whole reference (descriptive)."""
        resampler = ArmResampler(ref, device="cpu")
        parts = seed_blocks(self.args.num_samples, self.args.seed_blocks)
        out = {}
        for label, feats in features.items():
            per = [resampler.evaluate(feats, b[None, :]) for b in parts]
            out[label] = {m: np.concatenate([v[m] for v in per]) for m in BETTER}
        return out

    def score(self) -> dict[str, Any]:
        """The results record (see :mod:`.primary_report` for what the report says of it)."""
        a = self.args
        extractor, description = make_extractor(None, a.classifier, a.model, self.device)
        ref = self._reference(extractor, "reference_features.npz")
        features, scores = self._scores(self.store, self.arms, extractor, ref)
        full = {label: s["metrics"] for label, s in scores.items()}
        draws = bootstrap_draws(a.num_samples, len(ref["pool"]), a.bootstrap, a.seed)
        boot = resampled_metrics(features, ref, draws, spatial_reps=a.sfid_bootstrap, log=self.log)
        blocks = self._block_metrics(features, ref)
        z = bonferroni_z(ALPHA, len(PRIMARY))
        primary = [
            {
                **c.__dict__,
                "b": list(c.b),
                "fid": compare(c, "fid", full, boot, blocks, z),
                "exploratory": {m: compare(c, m, full, boot, blocks, None) for m in BETTER if m != "fid"},
            }
            for c in PRIMARY
        ]
        second = make_second_extractor(a.second_classifier, a.model, self.device)
        record = self._record(extractor, description, scores, primary, z)
        add_reference(
            record,
            ref,
            inception=False,
            model=a.model,
            extractors=[e for e in (extractor, second) if e],
            reference=reference_record(
                "held-out", reference_indices("held-out", None, a.dataset, a.data_dir), a.dataset, a.data_dir
            ),
        )
        record["ddim_check"] = self._ddim_check(extractor, ref)
        record["agreement"] = self._second(second, scores, primary) if second is not None else None
        return record

    def _record(
        self,
        extractor: Any,
        description: str,
        scores: dict[str, Any],
        primary: list[dict[str, Any]],
        z: float,
    ) -> dict[str, Any]:
        """The record's run description, arms and primary comparisons."""
        training = _read_json(Path(self.args.model) / "training.json") or {}
        keys = ("steps", "final_loss", "wall_time_s", "command", "num_images", "data_split", "dataset_name")
        return {
            "protocol": PROTOCOL,
            "document": "docs/evaluation.md",
            "command": self.args.command,
            "config": self.config,
            "environment": environment(self.device, self.dist.world),
            "model_training": {k: training.get(k) for k in keys},
            "extractor": {"name": extractor.name, "identity": extractor.identity, "description": description},
            "arms": {label: {**scores[label], "spec": _spec(arm)} for label, arm in self.arms.items()},
            "statistics": {
                "alpha": ALPHA,
                "primary_comparisons": len(PRIMARY),
                "z": z,
                "bootstrap": self.args.bootstrap,
                "resample_reference": True,
                "sfid_bootstrap": self.args.sfid_bootstrap,
                "seed_blocks": self.args.seed_blocks,
                "block_sizes": [len(b) for b in seed_blocks(self.args.num_samples, self.args.seed_blocks)],
                "correction": f"Bonferroni over the {len(PRIMARY)} primary FID comparisons: delta +- {z:.3f} "
                "bootstrap se (reference resampled too); verdict from the corrected interval",
            },
            "primary": primary,
            "shards_written": len(self.written),
        }

    def _ddim_check(self, extractor: Any, ref: dict[str, np.ndarray]) -> dict[str, Any]:
        """The SAG effect (FID of u + SAG minus u, and each FID) on the check's seeds under the protocol's
        sampler and under 50 DDIM steps (exploratory)."""
        labels = DDIM_CHECK["arms"]
        n = sum(len(r) for r in self.check_store.ranges)
        main = ShardStore(self.store.root, self.check_store.ranges, self.store.config_digest)
        out = {"samples": n, "arms": list(labels)}
        for name, store in (
            (f"{self.args.scheduler} {self.args.steps}", main),
            ("ddim 50", self.check_store),
        ):
            _, scores = self._scores(store, {k: self.arms[k] for k in labels}, extractor, ref)
            fids = {k: scores[k]["metrics"]["fid"] for k in labels}
            out[name] = {"fid": fids, "sag_effect": fids[labels[1]] - fids[labels[0]]}
        return out

    def _second(self, second: Any, scores: dict[str, Any], primary: list[dict[str, Any]]) -> dict[str, Any]:
        """The second extractor's FIDs (full samples): the rank agreement with the first over the arms and
        the sign of each primary comparison under it (exploratory)."""
        ref2 = self._reference(
            second, f"reference_features_{hashlib.sha256(second.identity.encode()).hexdigest()[:12]}.npz"
        )
        _, scores2 = self._scores(self.store, self.arms, second, ref2)
        fid1 = [scores[k]["metrics"]["fid"] for k in self.arms]
        fid2 = [scores2[k]["metrics"]["fid"] for k in self.arms]
        same = {}
        for c in PRIMARY:
            d2 = scores2[c.a]["metrics"]["fid"] - min(scores2[b]["metrics"]["fid"] for b in c.b)
            d1 = next(p["fid"]["delta"] for p in primary if p["id"] == c.id)
            same[c.id] = {"delta": float(d2), "same_sign": bool(np.sign(d2) == np.sign(d1))}
        return {
            "second_extractor": second.identity,
            "fid": {k: scores2[k]["metrics"]["fid"] for k in self.arms},
            "kendall_tau_fid": kendall_tau(fid1, fid2),
            "primary": same,
        }


def _spec(arm: Arm) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arm.settings().items()}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
