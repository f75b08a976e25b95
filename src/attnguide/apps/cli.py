"""The ``attnguide`` command.

``attnguide sample`` (the main job): the same seeds sampled without and with each guidance, side by
side in one labelled PNG grid, plus a PNG of the self-attention masks SAG used (paper Fig. 4). By default
it uses the model shipped in the package, offline; ``--model`` takes any local diffusers pipeline or
model folder, or a hub id.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..pipelines.schedulers import SCHEDULER_NAMES

BUNDLED_MODEL = Path(__file__).parent.parent / "assets" / "mnist-ddpm"
METHODS = ("none", "sag", "blur", "pag", "cfg", "cfg+sag", "cfg+pag", "sag+pag")
CONDITIONAL_METHODS = {"cfg", "cfg+sag", "cfg+pag"}
# subcommands that live in their own module, each with main(argv): name -> (module, help)
SUBCOMMANDS = {
    "train": (".train", "train the bundled MNIST model and digit classifier (attnguide train --help)"),
    "bench": (".bench", "time attnguide against diffusers' pipelines (attnguide bench --help)"),
    "eval": (".evaluate", "reproduce the SAG paper's tables on the bundled model (attnguide eval --help)"),
    "demo": (
        ".demo",
        "interactive offline web demo on 127.0.0.1 (attnguide demo --help; needs the demo extra)",
    ),
}


@dataclass(frozen=True)
class Arm:
    """One column of the grid: which terms, at which scales."""

    name: str
    guidance_scale: float
    sag_scale: float
    sag_mask: str
    pag_scale: float


def _arms(methods: Sequence[str], args) -> list[Arm]:
    arms = []
    for m in methods:
        terms = set(m.split("+"))
        cfg = args.cfg_scale if "cfg" in terms else 1.0
        sag = args.sag_scale if "sag" in terms else (args.blur_scale if "blur" in terms else 0.0)
        mask = "global" if "blur" in terms else "attention"
        pag = args.pag_scale if "pag" in terms else 0.0
        arms.append(Arm(m, cfg, sag, mask, pag))
    return arms


# ---------------------------------------------------------------------------------------------- files
def write_atomic(path: Path, write) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, then it is renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: refusing to overwrite existing file(s): {', '.join(existing)} "
            "(pass --overwrite to replace them)"
        )


# ---------------------------------------------------------------------------------------------- model
def load_pipeline(model: str, device: str):
    """A guided pipeline for ``model``: the bundled model, a local folder, or a hub id.

    A folder with ``model_index.json`` is loaded as a pipeline (Stable Diffusion pipelines become
    :class:`StableDiffusionSAGPipeline`; UNet2DModel pipelines :class:`DDPMSAGPipeline`); a folder with a
    bare ``UNet2DModel`` gets a default DDPM scheduler.
    """
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

    from ..pipelines import DDPMSAGPipeline, StableDiffusionSAGPipeline

    try:
        index = DiffusionPipeline.load_config(model)
    except Exception:  # not a pipeline: maybe a bare model folder
        index = None
    if index is not None and "unet" in index:
        if "text_encoder" in index:
            pipe = StableDiffusionSAGPipeline.from_pretrained(
                model, safety_checker=None, requires_safety_checker=False
            )
        else:
            unet = UNet2DModel.from_pretrained(model, subfolder="unet")
            sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
            pipe = DDPMSAGPipeline(unet, sched)
    else:
        try:
            unet = UNet2DModel.from_pretrained(model)
        except Exception as err:
            raise SystemExit(
                f"error: --model {model!r} is neither a diffusers pipeline nor a UNet2DModel folder ({err})"
            ) from None
        pipe = DDPMSAGPipeline(unet, DDPMScheduler())
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------- images
def _to_uint8(images) -> np.ndarray:
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return (arr.clip(0, 1) * 255).round().astype(np.uint8)


def make_grid(
    columns: dict[str, np.ndarray], scale: int = 1, row_labels: Sequence[str] | None = None
) -> Image.Image:
    """A labelled grid: one column per entry of ``columns`` (N, H, W, 3 uint8 images), rows = same seed."""
    names = list(columns)
    n, h, w, _ = columns[names[0]].shape
    h, w = h * scale, w * scale
    pad, head = 4, 18
    left = 40 if row_labels else 0
    col_w = max(w, 8 * max(len(s) for s in names) + 4)
    canvas = Image.new("RGB", (left + len(names) * (col_w + pad) + pad, head + n * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        x0 = left + pad + j * (col_w + pad)
        draw.text((x0 + 2, 3), name, fill="black")
        for i in range(n):
            tile = Image.fromarray(columns[name][i]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x0 + (col_w - w) // 2, head + pad + i * (h + pad)))
    if row_labels:
        for i, label in enumerate(row_labels):
            draw.text((3, head + pad + i * (h + pad) + h // 2 - 5), label, fill="black")
    return canvas


def overlay_masks(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Red overlay of the mean SAG mask (N, h, w in [0, 1]) on the images (N, H, W, 3 uint8)."""
    out = []
    for img, m in zip(images, masks, strict=True):
        up = (
            np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(img.shape[1::-1], Image.NEAREST))
            / 255.0
        )
        base = img.astype(np.float32) * 0.6
        base[..., 0] += 255 * 0.4 * up
        out.append(base.clip(0, 255).astype(np.uint8))
    return np.stack(out)


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


def cmd_sample(args) -> int:
    """Sample the same seeds with each method; write the grid and the masks."""
    from tqdm.auto import tqdm

    from ..pipelines import DDPMSAGPipeline
    from ..pipelines.schedulers import scheduler_from_name

    out_dir = Path(args.out)
    grid_path, mask_path, meta_path = out_dir / "samples.png", out_dir / "masks.png", out_dir / "samples.json"
    _check_outputs([grid_path, mask_path, meta_path], args.overwrite)
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

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device)
    pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pixel = isinstance(pipe, DDPMSAGPipeline)
    num_classes = pipe.num_classes if pixel else None
    if not pixel or num_classes is None:
        dropped = [m for m in methods if m in CONDITIONAL_METHODS and pixel]
        methods = [m for m in methods if m not in dropped]
    labels = _parse_labels(args.class_label, args.num_images, num_classes, args.seed) if pixel else None
    arms = _arms(methods, args)

    columns: dict[str, np.ndarray] = {}
    masks = None
    total = len(arms) * args.steps
    with tqdm(total=total, desc="sampling", unit="step", disable=args.quiet) as bar:
        for arm in arms:
            gen = torch.Generator(device="cpu").manual_seed(args.seed)
            common = dict(
                num_inference_steps=args.steps,
                generator=gen,
                guidance_scale=arm.guidance_scale,
                sag_scale=arm.sag_scale,
                sag_mask=arm.sag_mask,
                sag_blur_sigma=args.blur_sigma,
                pag_scale=arm.pag_scale,
                record_masks=arm.name in ("sag", "cfg+sag"),
            )
            if pixel:
                latents = torch.randn(
                    (args.num_images, pipe.unet.config.in_channels, *_size(pipe.unet.config.sample_size)),
                    generator=gen,
                )
                images = pipe(
                    args.num_images,
                    output_type="np",
                    class_labels=None if (args.unconditional and arm.guidance_scale <= 1) else labels,
                    latents=latents,
                    callback=lambda *_: bar.update(),
                    **common,
                ).images
            else:
                images = pipe(
                    [args.prompt] * args.num_images,
                    output_type="np",
                    callback=lambda *_: bar.update(),
                    **common,
                ).images
            columns[arm.name] = _to_uint8(images)
            guider = pipe.last_guider
            if guider is not None and guider.mask_sum is not None and masks is None:
                masks = (guider.mask_sum[:, 0] / max(1, guider.mask_steps)).cpu().numpy()
                mask_source = arm.name

    scale = max(1, 96 // columns[arms[0].name].shape[1])
    row_labels = [f"{labels[i]}" for i in range(args.num_images)] if labels else None
    grid = make_grid(columns, scale=scale, row_labels=row_labels)
    write_atomic(grid_path, lambda p: grid.save(p, format="PNG"))
    written = [grid_path]
    if masks is not None:
        src = columns[mask_source]
        mgrid = make_grid(
            {mask_source: src, "SAG mask": overlay_masks(src, masks)}, scale=scale, row_labels=row_labels
        )
        write_atomic(mask_path, lambda p: mgrid.save(p, format="PNG"))
        written.append(mask_path)
    meta = {
        "model": str(args.model),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "seed": args.seed,
        "class_labels": labels,
        "columns": [arm.__dict__ for arm in arms],
        "blur_sigma": args.blur_sigma,
        "device": device,
    }
    write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
    written.append(meta_path)
    for p in written:
        print(f"wrote {p}")
    return 0


def _size(sample_size) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0], __package__)
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
