"""One ``attnguide eval`` run from parsed options to written report: check the folders' configuration,
calibrate the ablation masks, sample every arm's shards (this rank's share), then on rank 0 time the
methods, score the arms and write the results."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..arms import Arm
from ..files import write_json_atomic
from ..train.noisy_classifier import noisy_classifier_of
from .config import TERM_ROW_KEYS, check_config, config_digest, eval_config
from .cost import run_cost
from .distributed import Dist
from .experiments import (
    ROW_TERMS,
    Entry,
    TermRows,
    build_experiments,
    matched_sag_arms,
    unique_arms,
    with_matched_cfg,
)
from .features import FeatureExtractor
from .matching import measure_matched_weights
from .metrics import gaussian_stats
from .report import did_not_help, write_outputs
from .results import (
    add_reference,
    correct_comparisons,
    experiment_comparisons,
    experiment_notes,
    experiment_rows,
    extractor_agreement,
    run_record,
)
from .sampler import Sampler, load_model
from .scoring import (
    arm_statistics,
    make_extractor,
    make_second_extractor,
    reference_features,
    reference_indices,
    reference_record,
    score_arms,
    seed_blocks,
)
from .shards import ShardStore, sample_tasks, shard_ranges, warn

__all__ = ["Evaluation"]

Experiments = dict[str, list[Entry]]


class Evaluation:
    """An evaluation run in one process (one rank of a torchrun launch): :meth:`run` samples this rank's
    shards and, on rank 0, returns the results record (None on the other ranks)."""

    def __init__(
        self,
        args: argparse.Namespace,
        names: Sequence[str],
        scales: Sequence[float],
        sigmas: Sequence[float],
        device: str,
        dist: Dist,
        log: Callable[[str], None],
    ):
        self.args = args
        self.names = list(names)
        self.scales = scales
        self.sigmas = sigmas
        self.device = device
        self.dist = dist
        self.log = log
        self.out = Path(args.out)
        self.shard_dir = Path(args.shard_dir) if args.shard_dir else self.out / "shards"
        self.config = eval_config(args, self.names, scales, sigmas)
        self.ranges = shard_ranges(args.num_samples, args.batch_size)
        self.store = ShardStore(self.shard_dir, tuple(self.ranges), config_digest(self.config))
        self.written: list[str] = []

    def prepare_folders(self) -> None:
        """Refuse folders of another configuration (every rank checks, so a mismatch stops all of them);
        then rank 0 creates the folders and writes their ``config.json``."""
        check_config(self.out, self.config)
        check_config(self.shard_dir, self.config)
        self.dist.barrier()
        if self.dist.rank == 0:
            for folder in (self.out, self.shard_dir):
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / "config.json").exists():
                    write_json_atomic(folder / "config.json", self.config)
        self.dist.barrier()

    def load(self) -> Experiments:
        """Load the model into :attr:`sampler`; return the experiments' entries for this model."""
        a = self.args
        unet, sched_config = load_model(a.model, self.device)
        self.num_class_embeds = getattr(unet.config, "num_class_embeds", None)
        size = unet.config.sample_size
        self.image_size = size if isinstance(size, int) else min(size)
        self.sampler = Sampler(
            unet,
            sched_config,
            a.scheduler,
            a.steps,
            a.seed,
            self.device,
            self.num_class_embeds,
            classifier_path=a.noisy_classifier or str(noisy_classifier_of(a.model)),
        )
        return build_experiments(
            self.names,
            sag_scale=a.sag_scale,
            cfg_scale=a.cfg_scale,
            pag_scale=a.pag_scale,
            scales=self.scales,
            sigmas=self.sigmas,
            sag_sigmas=a.sag_sigmas,
            classifier_scale=a.classifier_scale,
            weak=TermRows(
                scales={cls.name: getattr(a, f"{cls.name}_scale") for cls in ROW_TERMS},
                options={key: getattr(a, key) for key in TERM_ROW_KEYS if not key.endswith("_scale")},
            ),
            image_size=self.image_size,
            conditional_model=self.num_class_embeds is not None,
        )

    def calibrate(self, experiments: Experiments) -> tuple[Experiments, dict[str, Any] | None]:
        """What some arms need measured before sampling, on the first ``--calibration-samples`` samples:
        the masking experiment's random / token / square / high-frequency masks cover the mean fraction
        of the attention mask of the same SAG arm (same blur), and each compute-matched CFG arm gets the
        weight whose update is as strong as its SAG arm's (:mod:`.matching`). Returns the experiments
        with these filled in, and the calibration record (None when no arm needs one)."""
        needs_masks = any(e.arm.needs_calibration for rows in experiments.values() for e in rows)
        sag_arms = matched_sag_arms(experiments)
        if not needs_masks and not sag_arms:
            return experiments, None
        n_cal = min(self.args.calibration_samples, self.args.num_samples)
        calibration: dict[str, Any] = {"samples": int(n_cal)}
        if needs_masks:
            experiments = self._calibrate_masks(experiments, n_cal, calibration)
        if sag_arms:
            matched = self._matched_weights(sag_arms, n_cal)
            calibration["matched_cfg"] = matched
            experiments = with_matched_cfg(experiments, {k: r["weight"] for k, r in matched.items()})
        if self.dist.rank == 0:
            write_json_atomic(self.shard_dir / "calibration.json", calibration)
        return experiments, calibration

    def _calibrate_masks(
        self, experiments: Experiments, n_cal: int, calibration: dict[str, Any]
    ) -> Experiments:
        """Fill in the ablation masks' fraction: the mean attention-mask fraction of the SAG arm that
        differs from the ablation only in its mask, over its first ``n_cal`` samples (its first shards).
        Records every such arm's fraction (``mask_fractions``) and the first one's as before (``arm``,
        ``attention_mask_fraction``)."""

        def reference(arm: Arm) -> Arm:
            return replace(arm, sag_mask="attention", sag_fraction=None).canonical()

        refs = {
            reference(e.arm).key: reference(e.arm)
            for rows in experiments.values()
            for e in rows
            if e.arm.needs_calibration
        }
        cal_shards = [j for j, r in enumerate(self.ranges) if r.start < n_cal]
        self._sample([(arm, j) for arm in refs.values() for j in cal_shards])
        fractions = {}
        for key, arm in refs.items():
            fracs = np.concatenate([self._read(arm, j)["mask_fraction"] for j in cal_shards])[:n_cal]
            fractions[key] = float(np.clip(fracs.mean(), 1.0 / self.image_size**2, 1.0))
            self.log(f"attention mask of {key} covers {fractions[key]:.4f} of the pixels ({n_cal} samples)")
        first = next(iter(fractions))
        calibration.update(arm=first, attention_mask_fraction=fractions[first], mask_fractions=fractions)
        return {
            name: [
                replace(e, arm=replace(e.arm, sag_fraction=fractions[reference(e.arm).key]))
                if e.arm.needs_calibration
                else e
                for e in rows
            ]
            for name, rows in experiments.items()
        }

    def _matched_weights(self, sag_arms: dict[str, Arm], n_cal: int) -> dict[str, dict[str, Any]]:
        """The compute-matched CFG weight of each SAG arm (by key), kept in ``matching.json``: rank 0
        measures the arms that file lacks for this run's config digest, then every rank reads the same
        weights (so every rank samples the same arms, and a resumed run reuses them)."""
        path = self.shard_dir / "matching.json"
        if self.dist.rank == 0:
            cached = self._cached_matching(path, n_cal)
            todo = {k: a for k, a in sag_arms.items() if k not in cached}
            if todo:
                cached.update(measure_matched_weights(self.sampler, todo, self.ranges, n_cal, self.log))
                record = {"kind": "matching", "config_digest": self.store.config_digest, "arms": cached}
                write_json_atomic(path, record)
        self.dist.barrier()
        weights = self._cached_matching(path, n_cal)
        missing = sorted(set(sag_arms) - set(weights))
        if missing:
            raise RuntimeError(f"{path} lacks the matched CFG weight of {', '.join(missing)} after measuring")
        return {k: weights[k] for k in sag_arms}

    def _cached_matching(self, path: Path, n_cal: int) -> dict[str, dict[str, Any]]:
        """The matched-CFG records of ``matching.json`` measured on ``n_cal`` samples, if the file is
        readable and records this run's config digest, else none (with a warning for a file that is
        there but not usable)."""
        if not path.exists():
            return {}
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            warn(f"cannot read {path} ({type(err).__name__}: {err}); measuring the matched CFG weights again")
            return {}
        mine = ("matching", self.store.config_digest)
        if not isinstance(cached, dict) or (cached.get("kind"), cached.get("config_digest")) != mine:
            cached = None
        if cached is None or not isinstance(cached.get("arms"), dict):
            warn(f"{path} records another run (kind / config digest); measuring the matched weights again")
            return {}
        return {k: r for k, r in cached["arms"].items() if isinstance(r, dict) and r.get("samples") == n_cal}

    def _sample(self, tasks: Sequence[tuple[Arm, int]]) -> None:
        """Sample this rank's share of ``tasks``, then wait for the other ranks."""
        self.written += sample_tasks(tasks, self.sampler, self.store, self.dist, self.log)
        self.dist.barrier()

    def _read(self, arm: Arm, j: int) -> dict[str, np.ndarray]:
        """Shard ``j`` of ``arm``, which the sampling has written; RuntimeError if it is not readable."""
        data = self.store.read(arm, j)
        if data is None:
            raise RuntimeError(f"shard {j} of arm {arm.key} is missing after sampling")
        return data

    def _cached_cost(self, path: Path) -> dict[str, Any] | None:
        """The timings in ``cost.json`` if it is readable and records this run's config digest."""
        if not path.exists():
            return None
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            warn(f"cannot read {path} ({type(err).__name__}: {err}); timing the methods again")
            return None
        if not isinstance(cached, dict) or not isinstance(cached.get("cost"), dict):
            warn(f"{path} holds no cost record (an older attnguide wrote it?); timing the methods again")
            return None
        if (cached.get("kind"), cached.get("config_digest")) != ("cost", self.store.config_digest):
            warn(f"{path} records another run (kind / config digest); timing the methods again")
            return None
        return cached["cost"]

    def measure_cost(self) -> dict[str, Any] | None:
        """The cost experiment's timings (rank 0 alone, after the sampling), kept in ``cost.json`` so a
        resumed run reports the same ones."""
        if "cost" not in self.names:
            return None
        path = self.shard_dir / "cost.json"
        cost = self._cached_cost(path)
        if cost is not None:
            return cost
        a = self.args
        scales = {name: getattr(a, f"{name}_scale") for name in ("sag", "cfg", "pag")}
        scales.update({cls.name: getattr(a, f"{cls.name}_scale") for cls in ROW_TERMS})
        cost = run_cost(self.sampler, a.cost_batch, scales, self.log)
        cost["device"] = self.device
        write_json_atomic(path, {"kind": "cost", "config_digest": self.store.config_digest, "cost": cost})
        return cost

    def _reference(self, extractor: FeatureExtractor, filename: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The reference digits' features by ``extractor`` (cached in ``OUT/filename``) and their
        Gaussians."""
        a = self.args
        ref = reference_features(
            self.out,
            extractor,
            a.num_reference,
            self.log,
            config_digest=self.store.config_digest,
            part=a.reference_part,
            filename=filename,
            dataset=a.dataset,
            data_dir=a.data_dir,
        )
        return ref, {k: gaussian_stats(ref[k]) for k in ("pool", "spatial") if k in ref}

    def _score_second(self, second: FeatureExtractor, arms: dict[str, Arm]) -> dict[str, dict[str, Any]]:
        """Every arm's metrics by the second extractor (its reference features cached beside the first's)."""
        tag = hashlib.sha256(second.identity.encode()).hexdigest()[:12]
        ref, ref_stats = self._reference(second, f"reference_features_{tag}.npz")
        scores, _ = score_arms(
            arms,
            self.store,
            second,
            ref,
            ref_stats,
            num_samples=self.args.num_samples,
            num_class_embeds=self.num_class_embeds,
            log=self.log,
        )
        return scores

    def score(
        self, experiments: Experiments, arms: dict[str, Arm], calibration: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The results record: every arm scored against the reference digits, every experiment's rows and
        paired comparisons (corrected for their number), and the second extractor's agreement."""
        a = self.args
        extractor, description = make_extractor(a.inception, a.classifier, a.model, self.device)
        second = make_second_extractor(a.second_classifier, a.model, self.device) if experiments else None
        results = run_record(
            a,
            self.config,
            device=self.device,
            world=self.dist.world,
            extractor=extractor,
            description=description,
            calibration=calibration,
            shards_written=len(self.written),
            second=second,
        )
        ref, ref_stats, reference = None, {}, None
        if experiments:
            ref, ref_stats = self._reference(extractor, "reference_features.npz")
            indices = reference_indices(a.reference_part, a.num_reference, a.dataset, a.data_dir)
            reference = reference_record(a.reference_part, indices, a.dataset, a.data_dir)
        used = [e for e in (extractor, second) if e is not None]
        add_reference(
            results, ref, inception=bool(a.inception), reference=reference, model=a.model, extractors=used
        )
        scores, features = score_arms(
            arms,
            self.store,
            extractor,
            ref or {},
            ref_stats,
            num_samples=a.num_samples,
            num_class_embeds=self.num_class_embeds,
            log=self.log,
        )
        stats = {}
        if experiments:
            kw = {"bootstrap": a.bootstrap, "blocks": a.seed_blocks, "seed": a.seed, "device": self.device}
            stats = arm_statistics(features, ref or {}, **kw, log=self.log)
            sizes = [len(b) for b in seed_blocks(a.num_samples, a.seed_blocks)]
            results["statistics"] = {"block_sizes": sizes}
        cache: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for name, rows in experiments.items():
            comparisons = experiment_comparisons(rows, scores, stats, cache)
            notes = experiment_notes(
                name,
                rows,
                calibration=calibration,
                conditional_model=self.num_class_embeds is not None,
                image_size=self.image_size,
            )
            results["experiments"][name] = {
                "rows": experiment_rows(rows, scores, comparisons, num_samples=a.num_samples),
                "notes": notes,
                "comparisons": comparisons,
            }
        if experiments:
            correct_comparisons(results)
        if second is not None:
            extractor_agreement(results, self._score_second(second, arms), second.identity)
        return results

    def run(self) -> dict[str, Any] | None:
        """Sample, then (rank 0) score the arms and write ``metrics.json``, ``metrics.csv``, the plots and
        ``report.md``."""
        self.prepare_folders()
        experiments = self.load()
        experiments, calibration = self.calibrate(experiments)
        arms = unique_arms(experiments)
        self._sample([(arm, j) for arm in arms.values() for j in range(len(self.ranges))])
        if self.dist.rank != 0:
            return None
        cost = self.measure_cost()
        results = self.score(experiments, arms, calibration)
        if cost is not None:
            results["cost"] = cost
        results["did_not_help"] = did_not_help(results)
        results, pngs = write_outputs(results, self.out)
        self.log(
            f"wrote {self.out / 'report.md'}, metrics.json, metrics.csv and {len(pngs)} plot(s); "
            f"{len(self.written)} shard(s) sampled in this run"
        )
        return results
