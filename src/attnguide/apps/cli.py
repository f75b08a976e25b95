"""The ``attnguide`` command.

``attnguide sample`` (the main job): the same seeds sampled without and with each guidance, side by
side in one labelled PNG grid, plus a PNG of the self-attention masks SAG used (paper Fig. 4). By default
it uses the model shipped in the package, offline; ``--model`` takes any local diffusers pipeline or
model folder, or a hub id.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..pipelines.schedulers import SCHEDULER_NAMES
from .arms import CONDITIONAL_METHODS, METHODS, Arm
from .files import refuse_overwrite, write_atomic, write_json_atomic
from .images import make_grid, overlay_masks
from .loading import BUNDLED_MODEL, load_pipeline, sample_arm

# the columns whose SAG masks are recorded: the masks PNG shows the first of them that ran
MASK_COLUMNS = ("sag", "cfg+sag")
# subcommands that live in their own module, each with main(argv): name -> (module, help)
SUBCOMMANDS = {
    "train": (".train", "train the bundled MNIST model and digit classifier (attnguide train --help)"),
    "bench": (".bench", "time attnguide against diffusers' pipelines (attnguide bench --help)"),
    "eval": (".eval", "reproduce the SAG paper's tables on the bundled model (attnguide eval --help)"),
    "demo": (
        ".demo",
        "interactive offline web demo on 127.0.0.1 (attnguide demo --help; needs the demo extra)",
    ),
}


# ---------------------------------------------------------------------------------------------- sample
def _parse_labels(spec: str | None, n: int, num_classes: int | None, seed: int) -> list[int] | None:
    if num_classes is None:
        if spec not in (None, "none"):
            raise SystemExit("error: --class-label given, but the model is unconditional")
        return None
    real = num_classes - 1  # the last embedding is the null label
    if spec in (None, "cycle"):
        return [i % real for i in range(n)]
    if spec == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, real, (n,), generator=g).tolist()
    try:
        label = int(spec)
    except ValueError:
        raise SystemExit(
            f"error: --class-label must be an integer, 'cycle' or 'random', got {spec!r}"
        ) from None
    if not 0 <= label < real:
        raise SystemExit(f"error: --class-label must be in [0, {real - 1}], got {label}")
    return [label] * n


def _check_arguments(args: argparse.Namespace) -> list[str]:
    """The methods of ``--methods``; SystemExit for a bad argument (before anything is loaded)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"error: --methods: unknown {bad}; choose from {', '.join(METHODS)}")
    for name in ("sag_scale", "blur_scale", "pag_scale", "cfg_scale"):
        v = getattr(args, name)
        if not np.isfinite(v) or v < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.steps < 1 or args.num_images < 1:
        raise SystemExit("error: --steps and --num-images must be positive integers")
    return methods


def _column(arm: Arm) -> dict:
    """An arm as a column of ``samples.json``."""
    return {
        "name": arm.name,
        "guidance_scale": arm.guidance_scale,
        "sag_scale": arm.sag_scale,
        "sag_mask": arm.sag_mask,
        "pag_scale": arm.pag_scale,
    }


def _sample_columns(
    pipe, arms: Sequence[Arm], args: argparse.Namespace, labels: list[int] | None
) -> tuple[dict[str, np.ndarray], str | None, np.ndarray | None]:
    """The images of each arm, the name of the first arm with SAG masks, and its masks."""
    from tqdm.auto import tqdm

    columns: dict[str, np.ndarray] = {}
    mask_source, masks = None, None
    with tqdm(total=len(arms) * args.steps, desc="sampling", unit="step", disable=args.quiet) as bar:
        for arm in arms:
            columns[arm.name], arm_masks = sample_arm(
                pipe,
                arm,
                num_images=args.num_images,
                steps=args.steps,
                seed=args.seed,
                class_labels=None if (args.unconditional and arm.guidance_scale <= 1) else labels,
                prompt=args.prompt,
                record_masks=arm.name in MASK_COLUMNS,
                on_step=lambda _i: bar.update(),
            )
            if masks is None and arm_masks is not None:
                mask_source, masks = arm.name, arm_masks
    return columns, mask_source, masks


def _save_png(image) -> Callable[[Path], None]:
    return lambda p: image.save(p, format="PNG")


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample the same seeds with each method; write the grid and the masks."""
    from ..pipelines import DDPMSAGPipeline
    from ..pipelines.schedulers import scheduler_from_name

    out_dir = Path(args.out)
    grid_path, mask_path, meta_path = out_dir / "samples.png", out_dir / "masks.png", out_dir / "samples.json"
    refuse_overwrite([grid_path, mask_path, meta_path], args.overwrite)
    methods = _check_arguments(args)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device)
    pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pixel = isinstance(pipe, DDPMSAGPipeline)
    num_classes = pipe.num_classes if pixel else None
    if pixel and num_classes is None:  # CFG needs a class-conditional model
        methods = [m for m in methods if m not in CONDITIONAL_METHODS]
    if not methods:
        raise SystemExit("error: --methods: no method left to sample (CFG needs a conditional model)")
    labels = _parse_labels(args.class_label, args.num_images, num_classes, args.seed) if pixel else None
    scales = dict(cfg_scale=args.cfg_scale, sag_scale=args.sag_scale, pag_scale=args.pag_scale)
    arms = [
        Arm.from_method(m, **scales, blur_scale=args.blur_scale, sag_sigma=args.blur_sigma) for m in methods
    ]
    columns, mask_source, masks = _sample_columns(pipe, arms, args, labels)

    scale = max(1, 96 // columns[arms[0].name].shape[1])
    row_labels = [f"{labels[i]}" for i in range(args.num_images)] if labels else None
    write_atomic(grid_path, _save_png(make_grid(columns, scale=scale, row_labels=row_labels)))
    written = [grid_path]
    if masks is not None:
        src = columns[mask_source]
        overlay = {mask_source: src, "SAG mask": overlay_masks(src, masks)}
        write_atomic(mask_path, _save_png(make_grid(overlay, scale=scale, row_labels=row_labels)))
        written.append(mask_path)
    meta = {
        "model": str(args.model),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "seed": args.seed,
        "class_labels": labels,
        "columns": [_column(arm) for arm in arms],
        "blur_sigma": args.blur_sigma,
        "device": device,
    }
    write_json_atomic(meta_path, meta)
    written.append(meta_path)
    for p in written:
        print(f"wrote {p}")
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The parser of ``attnguide`` (``sample``; the other subcommands parse their own arguments)."""
    parser = argparse.ArgumentParser(prog="attnguide", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample without and with guidance, side by side (the main job)")
    s.add_argument(
        "--model", default=str(BUNDLED_MODEL), help="pipeline/model folder or hub id (default: bundled)"
    )
    s.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    s.add_argument(
        "--methods", default="none,sag,blur,pag,cfg,cfg+sag", help=f"columns, from {', '.join(METHODS)}"
    )
    s.add_argument("--sag-scale", type=float, default=0.75, help="SAG scale s (default 0.75)")
    s.add_argument("--blur-scale", type=float, default=0.75, help="blur guidance scale (default 0.75)")
    s.add_argument("--blur-sigma", type=float, default=1.0, help="Gaussian blur sigma (default 1.0)")
    s.add_argument("--pag-scale", type=float, default=1.0, help="PAG scale (default 1.0)")
    s.add_argument(
        "--cfg-scale", type=float, default=1.5, help="CFG scale w for the cfg columns (default 1.5)"
    )
    s.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    s.add_argument(
        "--scheduler", default="ddim", choices=sorted(SCHEDULER_NAMES), help="scheduler (default ddim)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed; every column uses the same one (default 0)")
    s.add_argument("--num-images", type=int, default=8, help="rows of the grid (default 8)")
    s.add_argument(
        "--class-label", default=None, help="class label of each row: N, 'cycle' (default), 'random'"
    )
    s.add_argument(
        "--unconditional",
        action="store_true",
        help="class-conditional models: sample the columns without CFG unconditionally (null label)",
    )
    s.add_argument("--prompt", default="", help="prompt, for text-to-image models")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    for name, (_module, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False).set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attnguide`` with ``argv`` (default: the command line); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0], __package__)
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
