"""One ``attnguide eval`` run from parsed options to written report: check the folders' configuration,
calibrate the ablation masks, sample every arm's shards (this rank's share), then on rank 0 time the
methods, score the arms and write the results."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..arms import Arm
from ..files import write_json_atomic
from .config import check_config, config_digest, eval_config
from .cost import run_cost
from .distributed import Dist
from .experiments import Entry, build_experiments, unique_arms
from .metrics import gaussian_stats
from .report import did_not_help, write_outputs
from .results import add_reference, experiment_notes, experiment_rows, run_record
from .sampler import Sampler, load_model
from .scoring import make_extractor, reference_features, score_arms
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
            unet, sched_config, a.scheduler, a.steps, a.seed, self.device, self.num_class_embeds
        )
        return build_experiments(
            self.names,
            sag_scale=a.sag_scale,
            cfg_scale=a.cfg_scale,
            pag_scale=a.pag_scale,
            scales=self.scales,
            sigmas=self.sigmas,
            image_size=self.image_size,
            conditional_model=self.num_class_embeds is not None,
        )

    def calibrate(self, experiments: Experiments) -> tuple[Experiments, dict[str, Any] | None]:
        """The masking experiment's random / square / high-frequency masks cover the attention mask's mean
        fraction, measured on the first shards of the SAG arm; returns the experiments with that fraction
        filled in, and the calibration record (None when no arm needs one)."""
        if not any(e.arm.needs_calibration for rows in experiments.values() for e in rows):
            return experiments, None
        sag_arm = Arm(sag_scale=self.args.sag_scale)
        n_cal = min(self.args.calibration_samples, self.args.num_samples)
        cal_shards = [j for j, r in enumerate(self.ranges) if r.start < n_cal]
        self._sample([(sag_arm, j) for j in cal_shards])
        fracs = np.concatenate([self._read(sag_arm, j)["mask_fraction"] for j in cal_shards])[:n_cal]
        fraction = float(np.clip(fracs.mean(), 1.0 / self.image_size**2, 1.0))
        calibration = {"arm": sag_arm.key, "samples": int(n_cal), "attention_mask_fraction": fraction}
        self.log(f"attention mask covers {fraction:.4f} of the pixels on average ({n_cal} samples)")
        calibrated = {
            name: [
                replace(e, arm=replace(e.arm, sag_fraction=fraction)) if e.arm.needs_calibration else e
                for e in rows
            ]
            for name, rows in experiments.items()
        }
        if self.dist.rank == 0:
            write_json_atomic(self.shard_dir / "calibration.json", calibration)
        return calibrated, calibration

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
        cost = run_cost(self.sampler, a.cost_batch, a.sag_scale, a.cfg_scale, a.pag_scale, self.log)
        cost["device"] = self.device
        write_json_atomic(path, {"kind": "cost", "config_digest": self.store.config_digest, "cost": cost})
        return cost

    def score(
        self, experiments: Experiments, arms: dict[str, Arm], calibration: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The results record: every arm scored against the real digits, every experiment's rows."""
        a = self.args
        extractor, description = make_extractor(a.inception, a.classifier, a.model, self.device)
        results = run_record(
            a,
            self.config,
            device=self.device,
            world=self.dist.world,
            extractor=extractor,
            description=description,
            calibration=calibration,
            shards_written=len(self.written),
        )
        ref, ref_stats = None, {}
        if experiments:
            ref = reference_features(
                self.out, extractor, a.num_reference, self.log, config_digest=self.store.config_digest
            )
            ref_stats = {k: gaussian_stats(ref[k]) for k in ("pool", "spatial") if k in ref}
        add_reference(results, ref, inception=bool(a.inception))
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
        intervals: dict[tuple[str, str], list[float]] = {}
        for name, rows in experiments.items():
            block_rows = experiment_rows(
                rows,
                scores,
                features,
                ref_stats,
                num_samples=a.num_samples,
                bootstrap=a.bootstrap,
                seed=a.seed,
                intervals=intervals,
            )
            notes = experiment_notes(
                name,
                rows,
                calibration=calibration,
                conditional_model=self.num_class_embeds is not None,
                image_size=self.image_size,
            )
            results["experiments"][name] = {"rows": block_rows, "notes": notes}
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
