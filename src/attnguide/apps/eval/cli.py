"""``attnguide eval``: the argument parser, option checks, and the entry points :func:`run` and
:func:`main`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...engine.terms import AppParam
from ...pipelines.schedulers import SCHEDULER_NAMES
from ..loading import BUNDLED_MODEL
from ..train.datasets import DATASETS, model_dataset
from .distributed import setup_distributed
from .experiments import (
    DEFAULT_CLASSIFIER_SCALE,
    DEFAULT_SAG_SIGMAS,
    DEFAULT_SCALES,
    DEFAULT_SIGMAS,
    EXPERIMENTS,
    ROW_TERMS,
    best_sigma,
)
from .model_card import DEFAULT_WEIGHTS, ModelCard
from .primary import PrimaryRun
from .results import command_line
from .runner import Evaluation
from .scoring import REFERENCE_PARTS, SECOND_CLASSIFIER

__all__ = ["ALONE", "build_parser", "experiment_names", "main", "parse_floats", "run"]

#: What runs alone: the pre-registered protocol (docs/evaluation.md) and the model card
#: (:mod:`.model_card`: loss curve, samples and conditional accuracy at several CFG weights).
ALONE = ("primary", "model")


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers (option ``name``); SystemExit otherwise."""
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: {name} must be a comma-separated list of numbers, got {text!r}") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise SystemExit(f"error: {name} must be finite numbers, got {text!r}")
    return vals


def experiment_names(spec: str) -> list[str]:
    """The experiments of ``spec`` ("all" or a comma-separated list) in :data:`EXPERIMENTS` order, or one
    of :data:`ALONE` (the pre-registered protocol of docs/evaluation.md; the model card), which run alone."""
    if spec == "all":
        return list(EXPERIMENTS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for alone in ALONE:
        if alone in names and names != [alone]:
            raise SystemExit(f"error: {alone!r} runs alone: give `attnguide eval {alone} ...`")
    if names and names[0] in ALONE:
        return names
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad or not names:
        raise SystemExit(
            f"error: unknown experiment(s) {bad or spec!r}; choose from {', '.join(EXPERIMENTS)}, all"
        )
    return [n for n in EXPERIMENTS if n in names]


def _sag_sigmas(text: str) -> tuple[float, ...]:
    vals = parse_floats(text, "--sag-sigmas")
    if any(v <= 0 for v in vals):
        raise SystemExit("error: --sag-sigmas must be positive")
    return vals


def _best_sigma_of(path: str) -> float:
    try:
        return best_sigma(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --best-sigma-from {path}: {err}") from None


def _inf_number(flag: str, setting: AppParam) -> Callable[[str], float | None]:
    """The type of a flag whose setting takes inf: a number in its range, or inf (None)."""

    def parse(text: str) -> float | None:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; give {setting.allowed()}") from None
        if not setting.accepts(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; give {setting.allowed()}")
        return None if math.isinf(value) else value

    return parse


def _add_term_options(p: argparse.ArgumentParser) -> None:
    """A scale flag for each of the :data:`ROW_TERMS` (default: its evaluation scale; 0 leaves its rows
    out) and a flag for each of their other flagged settings (``--seg-sigma``)."""
    for cls in ROW_TERMS:
        scale = cls.app.eval_scale
        p.add_argument(
            f"--{cls.name}-scale",
            type=float,
            default=scale,
            help=f"{cls.title} scale of the cfg experiment's {cls.title} rows and the cost experiment "
            f"(default {scale:g}; 0 leaves them out)",
        )
        for setting in cls.app.params[1:]:
            if setting.flag and setting.inf_allowed:
                p.add_argument(
                    setting.flag,
                    dest=f"{cls.name}_{setting.name}",
                    type=_inf_number(setting.flag, setting),
                    default=setting.default,
                    help=f"{setting.help}, {setting.allowed()} (default: inf)",
                )


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
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
    _add_term_options(p)
    p.add_argument(
        "--sag-sigmas",
        type=_sag_sigmas,
        default=DEFAULT_SAG_SIGMAS,
        help="blur sigmas of the scale sweep and the masking experiment (default 3, the paper's Table 5)",
    )
    p.add_argument(
        "--best-sigma-from",
        type=_best_sigma_of,
        default=None,
        metavar="METRICS_JSON",
        help="also run those at the lowest-FID sigma of the sigma experiment in this metrics.json",
    )
    p.add_argument(
        "--classifier-scale",
        type=float,
        default=DEFAULT_CLASSIFIER_SCALE,
        help="classifier-guidance scale of table3 (default %(default)s)",
    )
    p.add_argument(
        "--noisy-classifier",
        default=None,
        help="noise-aware classifier folder of table3's classifier guidance (default: the bundled one)",
    )
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


def _add_metric_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", default=None, help="digit classifier folder (default: MODEL/classifier)")
    p.add_argument(
        "--inception",
        default=None,
        help="Inception-v3 TorchScript file (inception-2015-12-05.pt convention) to use instead of the "
        "digit classifier",
    )
    p.add_argument(
        "--second-classifier",
        default=None,
        help="second digit classifier (another architecture / seed) whose features check the ranking of "
        f"the arms (default: MODEL/{SECOND_CLASSIFIER} if present; 'none' for none)",
    )
    p.add_argument(
        "--reference-part",
        default="held-out",
        choices=REFERENCE_PARTS,
        help="which digits of the train / held-out split are the FID reference (default: held-out, the "
        "1000 digits that `attnguide train` keeps from the models)",
    )
    p.add_argument(
        "--num-reference",
        type=int,
        default=None,
        help="use only the first N digits of the reference part (interleaved by class)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="paired bootstrap resamples of the seeds for every stated difference (default 1000)",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="the data set of the reference images (default: the one the model was trained on, as its "
        "training.json says; else mnist)",
    )
    p.add_argument("--data-dir", default=None, help="folder of Fashion-MNIST's IDX files (default: Debian's)")
    p.add_argument(
        "--sfid-bootstrap",
        type=int,
        default=200,
        help="primary protocol: resamples of the (exploratory) sFID intervals, the first of --bootstrap "
        "(default 200: a 343-d Frechet distance per arm and resample is slow on a CPU)",
    )
    p.add_argument(
        "--seed-blocks",
        type=int,
        default=3,
        help="disjoint blocks of seeds in which every stated difference is computed again; a finding needs "
        "the same sign in all of them (default 3)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``attnguide eval``."""
    p = argparse.ArgumentParser(
        prog="attnguide eval",
        description="Reproduce the SAG paper's tables (FID, sFID, IS, precision, recall) on a pixel-space "
        "model with paired seeds; resumable, shardable across processes with torchrun.",
    )
    p.add_argument(
        "experiment",
        help=f"experiment(s): {', '.join(EXPERIMENTS)}, a comma-separated list, or 'all'; or 'primary', "
        "the pre-registered protocol of docs/evaluation.md; or 'model', the model card (loss curve, "
        "samples and conditional accuracy at the --cfg-weights)",
    )
    p.add_argument("--out", required=True, help="output folder (metrics, plots, report.md)")
    _add_sampling_options(p)
    _add_metric_options(p)
    p.add_argument("--shard-dir", default=None, help="where sample shards go (default: OUT/shards)")
    p.add_argument(
        "--cfg-weights",
        dest="weights",
        type=lambda text: parse_floats(text, "--cfg-weights"),
        default=DEFAULT_WEIGHTS,
        help="model card: the CFG weights sampled, 1 = no CFG (default "
        f"{','.join(f'{w:g}' for w in DEFAULT_WEIGHTS)})",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def _check_options(
    args: argparse.Namespace, names: Sequence[str]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """SystemExit for options no run can use; returns the parsed (scales, sigmas)."""
    for name in ("num_samples", "steps", "batch_size", "cost_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive integer")
    if args.num_samples < 4 and any(n != "cost" for n in names):
        raise SystemExit("error: --num-samples must be at least 4 (k-NN precision/recall needs k + 1 = 4)")
    if args.bootstrap < 0:
        raise SystemExit("error: --bootstrap must be >= 0 (0: no intervals, so nothing is resolved)")
    if args.seed_blocks < 1 or (args.num_samples // args.seed_blocks < 2 and any(n != "cost" for n in names)):
        raise SystemExit(
            f"error: --seed-blocks must be >= 1 with at least 2 samples per block "
            f"(--num-samples {args.num_samples} allows at most {max(1, args.num_samples // 2)})"
        )
    if any(w < 0 for w in args.weights):
        raise SystemExit(f"error: --cfg-weights must be >= 0, got {args.weights}")
    if args.num_reference is not None and args.num_reference < 4:
        raise SystemExit("error: --num-reference must be at least 4 (k-NN precision/recall needs k + 1 = 4)")
    scales = ("sag", "cfg", "pag", *(cls.name for cls in ROW_TERMS), "classifier")
    for name in (f"{term}_scale" for term in scales):
        if not math.isfinite(getattr(args, name)):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be finite")
    if args.best_sigma_from is not None:
        args.sag_sigmas = (*args.sag_sigmas, args.best_sigma_from)
    if args.sag_scale == 0 and any(n in names for n in ("table1", "masking", "sigma", "cfg", "table3")):
        raise SystemExit("error: --sag-scale must not be 0 for the SAG experiments")
    scales = parse_floats(args.scales, "--scales")
    sigmas = parse_floats(args.sigmas, "--sigmas")
    if any(s <= 0 for s in sigmas):
        raise SystemExit("error: --sigmas must be positive")
    return scales, sigmas


def _set_threads(threads: int | None) -> None:
    """``--threads``, else an equal share of the cores for each local process of a torchrun launch."""
    if threads:
        torch.set_num_threads(threads)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))


def run(argv: Sequence[str]) -> dict[str, Any] | None:
    """Run ``attnguide eval`` with ``argv``; returns the results on rank 0 (None on other ranks)."""
    args = build_parser().parse_args(list(argv))
    args.argv = list(argv)
    args.dataset = args.dataset or model_dataset(args.model) or "mnist"
    names = experiment_names(args.experiment)
    scales, sigmas = _check_options(args, names)
    _set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist, device = setup_distributed(device)
    quiet = args.quiet

    def log(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    try:
        if names == ["primary"]:
            args.command = command_line(args.argv, dist.world)
            return PrimaryRun(args, device, dist, log).run()
        if names == ["model"]:
            args.command = command_line(args.argv, 1)
            return ModelCard(args, device, log).run() if dist.rank == 0 else None
        return Evaluation(args, names, scales, sigmas, device, dist, log).run()
    finally:
        dist.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``attnguide eval ...``; returns the exit status."""
    run(list(sys.argv[1:] if argv is None else argv))
    return 0
