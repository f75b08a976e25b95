"""The ``attnguide`` command.

``attnguide sample`` (the main job): the same seeds sampled without and with each guidance, side by
side in one labelled PNG grid, plus a PNG of the self-attention masks SAG used (paper Fig. 4). By default
it uses the model shipped in the package, offline; ``--model`` takes any local diffusers pipeline or
model folder, or a hub id.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import notices  # noqa: F401  (its filters go in before diffusers' pipelines import)
from ..engine.terms import AppParam
from ..pipelines.schedulers import SCHEDULER_NAMES
from .arms import ALONE_METHODS, CONDITIONAL_METHODS, METHOD_TERMS, METHODS, TERMS, Arm, method_terms
from .defaults import CFG_DEFAULT, CFG_RANGE, MAX_IMAGES, NUM_IMAGES, SCHEDULER, SEED, STEPS, term_flags
from .files import check_output_folder, refuse_overwrite, remove_files, write_atomic, write_text_atomic
from .images import make_grid, overlay_masks
from .loading import BUNDLED_MODEL, load_pipeline, model_kind, sample_arm

# the columns whose SAG masks are recorded: the masks PNG shows the first of them that ran
MASK_COLUMNS = ("sag", "cfg+sag")
# subcommands that live in their own module, each with main(argv): name -> (module, help)
SUBCOMMANDS = {
    "train": (".train", "train the bundled Fashion-MNIST model and its classifiers (attnguide train --help)"),
    "bench": (".bench", "time attnguide against diffusers' pipelines (attnguide bench --help)"),
    "eval": (".eval", "reproduce the SAG paper's tables on the bundled model (attnguide eval --help)"),
    "demo": (
        ".demo",
        "interactive offline web demo on 127.0.0.1 (attnguide demo --help; needs the demo extra)",
    ),
}


# ---------------------------------------------------------------------------------------------- sample
OUTPUT_FILES = ("samples.png", "masks.png", "samples.json")
# the flags whose values shape each guidance term (named when its samples are not finite)
TERM_FLAGS = {t: f"--{t}-scale" for t in TERMS}
#: The default columns of the grid: no guidance, then each term's methods alone, then CFG alone and with SAG.
DEFAULT_METHODS = ",".join(["none", *ALONE_METHODS, "cfg", "cfg+sag"])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _usage_error(flag: str, text: str) -> SystemExit:
    return SystemExit(f"error: {flag}: {text}")


def _check_device(spec: str | None) -> str:
    """The torch device of ``--device`` (default: cuda if available); SystemExit unless it exists here."""
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise _usage_error("--device", f"unknown device {spec!r}; use cpu, cuda, cuda:N or mps") from None
    backends = {
        "cuda": torch.cuda,
        "xpu": getattr(torch, "xpu", None),
        "mps": getattr(torch.backends, "mps", None),
    }
    if device.type == "cpu":
        return str(device)
    if device.type not in backends:
        raise _usage_error("--device", f"{spec!r} is not a device to sample on; use cpu, cuda, cuda:N or mps")
    backend = backends[device.type]
    if backend is None or not backend.is_available():
        raise _usage_error(
            "--device", f"{spec!r} requested, but this machine's torch ({torch.__version__}) has none"
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise _usage_error("--device", f"{spec!r} requested, but there are {count} {device.type} device(s)")
    return str(device)


def _check_label_spec(spec: str | None) -> None:
    if spec in (None, "none", "cycle", "random"):
        return
    try:
        int(spec)
    except ValueError:
        raise _usage_error("--class-label", f"got {spec!r}; give an integer, 'cycle' or 'random'") from None


def _parse_labels(spec: str | None, n: int, num_classes: int | None, seed: int) -> list[int] | None:
    if num_classes is None:
        if spec not in (None, "none"):
            raise _usage_error("--class-label", f"got {spec!r}, but the model is unconditional")
        return None
    real = num_classes - 1  # the last embedding is the null label
    if real < 1:
        raise _usage_error("--model", f"the model has {num_classes} class embedding(s), only the null label")
    if spec in (None, "cycle"):
        return [i % real for i in range(n)]
    if spec == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, real, (n,), generator=g).tolist()
    label = int(spec)
    if not 0 <= label < real:
        raise _usage_error("--class-label", f"got {label}; the model's labels are 0 to {real - 1}")
    return [label] * n


def _check_arguments(args: argparse.Namespace) -> list[str]:
    """The methods of ``--methods``; SystemExit for a bad argument (before anything is loaded)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise _usage_error("--methods", f"got {args.methods!r}, no method; choose from {', '.join(METHODS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise _usage_error("--methods", f"unknown {bad}; choose from {', '.join(METHODS)}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise _usage_error("--methods", f"{', '.join(twice)} listed more than once")
    for flag, dest, setting, _field in term_flags():
        v = getattr(args, dest)
        if not setting.accepts(v):
            raise _usage_error(flag, f"got {v}; allowed: {setting.allowed()}")
    if not (np.isfinite(args.cfg_scale) and CFG_RANGE[0] <= args.cfg_scale <= CFG_RANGE[1]):
        low, high = CFG_RANGE
        raise _usage_error(
            "--cfg-scale", f"got {args.cfg_scale}; allowed: a finite number in [{low:g}, {high:g}]"
        )
    if args.steps < 1:
        raise _usage_error("--steps", f"got {args.steps}; allowed: a positive integer")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise _usage_error("--num-images", f"got {args.num_images}; allowed: 1 to {MAX_IMAGES}")
    if not 0 <= args.seed < 2**63:
        raise _usage_error("--seed", f"got {args.seed}; allowed: 0 to 2**63 - 1")
    if not args.out:
        raise _usage_error("--out", "got an empty path; give a folder")
    _check_label_spec(args.class_label)
    return methods


def _method_needs(pipe, method: str, args: argparse.Namespace, pixel: bool) -> str | None:
    """Why the model cannot run ``method`` (None: it can): CFG on an unconditional model, or a term
    that cannot act on the denoiser (the engine's own refusal, before any model call)."""
    from ..engine.step import place_terms

    if pixel and pipe.num_classes is None and method in CONDITIONAL_METHODS:
        return "a class-conditional model"
    try:
        place_terms(pipe.unet, Arm.from_method(method, **_scales(args)).engine_terms())
    except ValueError as err:
        return str(err).splitlines()[0].replace("`", "")
    return None


def _check_model(pipe, args: argparse.Namespace, methods: list[str], pixel: bool) -> list[str]:
    """The methods this model can run and a check of ``--steps``; SystemExit naming the flag otherwise.
    A method of the default grid that the model cannot run is left out silently; one the user named,
    with a note."""
    limit = pipe.scheduler.config.num_train_timesteps
    if args.steps > limit:
        raise _usage_error("--steps", f"got {args.steps}; this model's scheduler allows 1 to {limit}")
    try:
        pipe.scheduler.set_timesteps(args.steps)
    except ValueError as err:
        raise _usage_error("--steps", f"got {args.steps}; {args.scheduler}: {err}") from None
    needs = {m: why for m in methods if (why := _method_needs(pipe, m, args, pixel)) is not None}
    kept = [m for m in methods if m not in needs]
    detail = "; ".join(
        f"{m} needs {why}" if why.startswith("a ") else f"{m}: {why}" for m, why in needs.items()
    )
    if not kept:
        raise _usage_error("--methods", f"got {args.methods!r}, none of which this model runs ({detail})")
    if needs and args.methods != DEFAULT_METHODS:
        print(f"note: --methods: skipping {', '.join(needs)} ({detail})", file=sys.stderr)
    if not pixel and args.class_label not in (None, "none"):
        raise _usage_error("--class-label", f"got {args.class_label!r}, but the model is text-to-image")
    return kept


def _column(arm: Arm) -> dict:
    """An arm as a column of ``samples.json``: its name, the pipelines' ``guidance_scale`` and every setting
    (SEG's sigma inf is null)."""
    return {"name": arm.name, "guidance_scale": arm.guidance_scale, **arm.settings()}


def _sample_columns(
    pipe, arms: Sequence[Arm], args: argparse.Namespace, labels: list[int] | None
) -> tuple[dict[str, np.ndarray], str | None, np.ndarray | None]:
    """The images of each arm, the name of the first arm with SAG masks, and its masks."""
    from tqdm.auto import tqdm

    columns: dict[str, np.ndarray] = {}
    mask_source, masks = None, None
    with tqdm(total=len(arms) * args.steps, desc="sampling", unit="step", disable=args.quiet) as bar:
        for arm in arms:
            try:
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
                    check_finite=True,
                )
            except FloatingPointError as err:
                flags = [TERM_FLAGS[t] for t in TERMS if t in method_terms(arm.name)] or ["--model"]
                raise _usage_error(
                    flags[0], f"the {arm.name} column failed with {', '.join(flags)} as given: {err}"
                ) from None
            if masks is None and arm_masks is not None:
                mask_source, masks = arm.name, arm_masks
    return columns, mask_source, masks


@contextlib.contextmanager
def _loading_bars(show: bool):
    """diffusers' and transformers' loading progress bars on or off for the block."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _ in before:
        (m.enable_progress_bar if show else m.disable_progress_bar)()
    try:
        yield
    finally:
        for m, was in before:
            (m.enable_progress_bar if was else m.disable_progress_bar)()


def _save_png(image) -> Callable[[Path], None]:
    return lambda p: image.save(p, format="PNG")


def _metadata(args: argparse.Namespace, arms: Sequence[Arm], labels, device: str, pixel: bool) -> str:
    """``samples.json``, as strict JSON (made before sampling, so it cannot fail after it)."""
    meta = {
        "model": str(args.model),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "seed": args.seed,
        "class_labels": labels,
        "prompt": None if pixel else args.prompt,
        "columns": [_column(arm) for arm in arms],
        "blur_sigma": args.blur_sigma,
        "device": device,
    }
    return json.dumps(meta, indent=2, allow_nan=False) + "\n"


def _scales(args: argparse.Namespace) -> dict:
    """The keywords of :meth:`Arm.from_method` given by the flags: CFG's weight, each method's scale and the
    terms' other settings (inf as None where a setting takes inf)."""
    out: dict = {"cfg_scale": args.cfg_scale}
    for _, dest, setting, field in term_flags():
        value = getattr(args, dest)
        out[field or dest] = None if (setting.inf_allowed and value == float("inf")) else value
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample the same seeds with each method; write the grid and the masks."""
    from ..pipelines import DDPMSAGPipeline
    from ..pipelines.schedulers import scheduler_from_name

    methods = _check_arguments(args)
    device = _check_device(args.device)
    kind = model_kind(args.model)  # a bad --model is named before anything about the output
    if kind != "text" and args.prompt:
        raise _usage_error(
            "--prompt",
            f"got {args.prompt!r}, but the model is class-conditional or unconditional (no text encoder); "
            "choose its classes with --class-label",
        )
    out_dir = Path(args.out)
    grid_path, mask_path, meta_path = (out_dir / name for name in OUTPUT_FILES)
    check_output_folder(out_dir, "--out")
    refuse_overwrite([grid_path, mask_path, meta_path], args.overwrite)

    with _loading_bars(not args.quiet):
        pipe = load_pipeline(args.model, device)
    pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pixel = isinstance(pipe, DDPMSAGPipeline)
    methods = _check_model(pipe, args, methods, pixel)
    labels = _parse_labels(args.class_label, args.num_images, pipe.num_classes, args.seed) if pixel else None
    arms = [Arm.from_method(m, **_scales(args)) for m in methods]
    meta_text = _metadata(args, arms, labels, device, pixel)
    columns, mask_source, masks = _sample_columns(pipe, arms, args, labels)

    scale = max(1, 96 // columns[arms[0].name].shape[1])
    from .train.datasets import model_class_names  # the train package is heavy: only where labels are

    names = model_class_names(args.model) if labels else None
    row_labels = [names[y] if names else str(y) for y in labels[: args.num_images]] if labels else None
    write_atomic(grid_path, _save_png(make_grid(columns, scale=scale, row_labels=row_labels)))
    written = [grid_path]
    if masks is not None:
        src = columns[mask_source]
        overlay = {mask_source: src, "SAG mask": overlay_masks(src, masks)}
        write_atomic(mask_path, _save_png(make_grid(overlay, scale=scale, row_labels=row_labels)))
        written.append(mask_path)
    write_text_atomic(meta_path, meta_text)
    written.append(meta_path)
    # --overwrite: a file of the run replaced that this run does not write would pass for one of its own
    for p in remove_files([p for p in (grid_path, mask_path, meta_path) if p not in written]):
        print(f"removed {p} (of the previous run)")
    for p in written:
        print(f"wrote {p}")
    return 0


def _help(flag: str, setting: AppParam) -> str:
    """A flag's help: what it sets, the range, the default and why it differs from the library's."""
    method = flag[2:].removesuffix("-scale")
    if flag.endswith("-scale") and method in METHOD_TERMS:
        cls = METHOD_TERMS[method][0]
        what = f"{cls.method_title(method)} scale"
    else:
        what = setting.help
    why = f"; {setting.why}" if setting.why else ""
    return f"{what}, {setting.allowed()} (default {setting.app_default:g}{why})".replace("%", "%%")


# ---------------------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: ``error: <flag>: <message>``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``attnguide`` (``sample``; the other subcommands parse their own arguments)."""
    parser = _Parser(prog="attnguide", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample without and with guidance, side by side (the main job)")
    s.add_argument(
        "--model", default=str(BUNDLED_MODEL), help="pipeline/model folder or hub id (default: bundled)"
    )
    s.add_argument(
        "--out",
        default="outputs",
        help="output folder (default: outputs); its samples.png, masks.png, samples.json",
    )
    s.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"columns (default {DEFAULT_METHODS}), from {', '.join(METHODS)}",
    )
    for flag, dest, setting, _field in term_flags():
        s.add_argument(flag, dest=dest, type=float, default=setting.app_default, help=_help(flag, setting))
    s.add_argument(
        "--cfg-scale",
        type=float,
        default=CFG_DEFAULT,
        help=f"CFG scale w in [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] for the cfg columns (default "
        f"{CFG_DEFAULT})",
    )
    s.add_argument(
        "--steps",
        type=int,
        default=STEPS,
        help=f"sampling steps, 1 to the scheduler's training steps (default {STEPS})",
    )
    s.add_argument(
        "--scheduler",
        default=SCHEDULER,
        choices=sorted(SCHEDULER_NAMES),
        help=f"scheduler (default {SCHEDULER})",
    )
    s.add_argument(
        "--seed", type=int, default=SEED, help=f"seed; every column uses the same one (default {SEED})"
    )
    s.add_argument(
        "--num-images",
        type=int,
        default=NUM_IMAGES,
        help=f"rows of the grid, 1 to {MAX_IMAGES} (default {NUM_IMAGES}: one per class of the bundled "
        "model)",
    )
    s.add_argument(
        "--class-label", default=None, help="class label of each row: N, 'cycle' (default), 'random'"
    )
    s.add_argument(
        "--unconditional",
        action="store_true",
        help="class-conditional models: sample the columns without CFG unconditionally (null label)",
    )
    s.add_argument("--prompt", default="", help="prompt, for text-to-image models")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output files of a previous run (and remove its masks.png if this run has none)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bars (loading, sampling)")
    s.set_defaults(func=cmd_sample)

    for name, (_module, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False).set_defaults(func=None)
    return parser


#: The optional packages of the subcommands, and the extra that installs each.
EXTRAS = {
    "mlxtend": "train",
    "scipy": "eval",
    "matplotlib": "eval",
    "threadpoolctl": "eval",
    "gradio": "demo",
}


def _missing_extra(command: str, err: ModuleNotFoundError) -> BaseException:
    """The one-line error for a subcommand whose optional package is missing (the import error itself
    for any other module)."""
    extra = EXTRAS.get((err.name or "").split(".")[0])
    if extra is None:
        return err
    return SystemExit(
        f'error: attnguide {command} needs {err.name}, which is not installed: pip install -e ".[{extra}]" '
        f"(or pip install {err.name})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attnguide`` with ``argv`` (default: the command line); returns the exit status.

    A user error (``SystemExit("error: ...")`` from any subcommand) is printed as one line on stderr and
    exits with status 2, argparse's convention; the SystemExit still carries the message.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            try:
                module = importlib.import_module(SUBCOMMANDS[argv[0]][0], __package__)
                return module.main(argv[1:])
            except ModuleNotFoundError as err:
                raise _missing_extra(argv[0], err) from None
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as err:
        if isinstance(err.code, str) and err.code.startswith("error:"):
            print(" ".join(err.code.split()), file=sys.stderr)
            err.code = 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
