"""``attnguide demo``: an interactive, offline Gradio app to compare sampling with and without guidance.

Pick a method (SAG, blur guidance, PAG, SEG, TPG, SLG, CFG and combinations such as CFG+SEG), the
scales, the blur sigma, SEG's query blur sigma, the SAG / PAG layer, the scheduler, the number of steps,
the seed and a class label (class-conditional models) or a prompt (text models); Generate samples the
same seeds without and with the guidance and shows both side by side, with the self-attention masks SAG
used. A "Methods" table in the page (:data:`METHODS_TABLE`) says what each term's weak prediction is, what
it costs per step and its defaults.

The app is served on 127.0.0.1 only, without share links or analytics, with gradio's bundled fonts: it
starts and runs with no network. Needs the ``demo`` extra: ``pip install -e ".[demo]"``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine.guidance import in_window
from ..pipelines.schedulers import SCHEDULER_NAMES, scheduler_from_name
from .arms import Arm
from .images import overlay_masks
from .loading import BUNDLED_MODEL, load_pipeline, sample_arm

# The method dropdown: guidance terms (attnguide.apps.arms.TERMS, in capitals but "blur") joined by "+".
METHODS = (
    "SAG",
    "blur",
    "PAG",
    "CFG",
    "CFG+SAG",
    "CFG+PAG",
    "SAG+PAG",
    "CFG+SAG+PAG",
    "SEG",
    "TPG",
    "SLG",
    "CFG+SEG",
    "CFG+TPG",
    "CFG+SLG",
    "none",
)
LIMITS = {  # name -> (minimum, maximum), inclusive; "SEG sigma" is any number > 0 or inf (_seg_sigma)
    "SAG scale": (0.0, 10.0),
    "PAG scale": (0.0, 10.0),
    "SEG scale": (0.0, 10.0),
    "TPG scale": (0.0, 10.0),
    "SLG scale": (0.0, 10.0),
    "CFG scale": (1.0, 30.0),
    "Blur sigma": (0.1, 10.0),
    "Steps": (1, 500),
    "Seed": (0, 2**32 - 1),
    "Images": (1, 16),
}
UNCONDITIONAL = "unconditional (null label)"
CYCLE = "cycle (one label per image)"
TILE_PIXELS = 112  # small images are upscaled (nearest) to about this size, so 28x28 digits are visible
# The "Methods" accordion of the page: one row per term of the dropdown (README's table of the family,
# with the demo's own defaults, which follow `attnguide sample`'s).
METHODS_TABLE = """\
Each term pushes the prediction away from a weaker one: out += s (ref - weak) at its scale s, where ref is
the conditional prediction c (SAG and blur guidance with CFG: the unconditional u, as diffusers); CFG is
out = u + w (c - u). Combined methods add their terms. A *row block* is more rows in the one batched model
call of a step (a bigger batch, no extra call); SAG and blur guidance need a call of their own, because
their input differs. SEG, TPG and SLG act on the model's default layers, not on the layer field.

| method | the weak prediction | model passes per step | defaults here |
|---|---|---|---|
| SAG (arXiv 2210.00939) | the model on x_t with its x0 estimate blurred where the self-attention map \
of the layer field is high, re-noised | +1 model call (its input differs) | SAG scale 0.75, blur sigma 1, \
kernel 9, the layer field (default: the mid block's) |
| blur guidance (SAG's Sec. 5.1) | as SAG, with the whole x0 estimate blurred (no mask) | +1 model call \
(its input differs) | SAG / blur scale 0.75, blur sigma 1 |
| PAG (arXiv 2403.17377) | identity self-attention (output V) in the layer field's layer | +1 row block \
| PAG scale 1.0 (the library's `PAG`: 3.0) |
| SEG (arXiv 2408.00760) | the queries of PAG's default layers (UNets: the mid block) blurred over the \
token grid with a Gaussian of SEG sigma tokens (inf: every query is the mean query) | +1 row block | \
SEG scale 3.0, SEG sigma inf |
| TPG (arXiv 2506.10036) | the tokens entering the blocks of PAG's default layers shuffled by one random \
permutation (norm-preserving) | +1 row block | TPG scale 0.2 (the library's `TPG`: 3.0; on the bundled \
model 0.5 already breaks the strokes at 50 steps) |
| SLG (skip-layer guidance, SD3.5) | blocks 7, 8, 9 where the model has them (else the mid block's) \
skipped: output = input | +1 row block, in its step window only | SLG scale 1.0 (the library's `SLG`: \
2.8), window 1-20 % of the steps |
| CFG | the unconditional prediction (the null label; text models: the empty prompt) | +1 row block | \
CFG scale 1.5 (the CLI's: w = 3 distorts the bundled model's digits) |
"""


class InputError(ValueError):
    """A form value that cannot be used; its message is shown in the page."""


@dataclass(frozen=True)
class Settings:
    """The validated form."""

    method: str
    sag_scale: float
    pag_scale: float
    cfg_scale: float
    blur_sigma: float
    seg_scale: float
    seg_sigma: float  # math.inf: SEG's limit, every query is the mean query
    tpg_scale: float
    slg_scale: float
    layer: str
    steps: int
    scheduler: str
    seed: int
    label: str
    prompt: str
    num_images: int

    def arm(self, method: str) -> Arm:
        """The arm of a method of the dropdown, with the form's scales, blur sigma and SEG sigma."""
        return Arm.from_terms(
            dropdown_terms(method),
            name=method,
            cfg_scale=self.cfg_scale,
            sag_scale=self.sag_scale,
            pag_scale=self.pag_scale,
            seg_scale=self.seg_scale,
            tpg_scale=self.tpg_scale,
            slg_scale=self.slg_scale,
            sag_sigma=self.blur_sigma,
            seg_sigma=None if math.isinf(self.seg_sigma) else self.seg_sigma,
        )


def dropdown_terms(method: str) -> frozenset[str]:
    """The guidance terms of a method of the dropdown ("CFG+SAG" -> {"cfg", "sag"}; "none" -> {})."""
    return frozenset() if method == "none" else frozenset(method.lower().split("+"))


# ---------------------------------------------------------------------------------------- validation
def _number(name: str, value: Any, *, integer: bool = False) -> float | int:
    lo, hi = LIMITS[name]
    what = "a whole number" if integer else "a number"
    if value is None or value == "":
        raise InputError(f"{name} is empty: enter {what} from {lo} to {hi}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {what} from {lo} to {hi}, got {value!r}.") from None
    if not math.isfinite(v) or not lo <= v <= hi or (integer and v != int(v)):
        shown = int(v) if math.isfinite(v) and v == int(v) else value
        raise InputError(f"{name} must be {what} from {lo} to {hi}, got {shown}.")
    return int(v) if integer else v


def _seg_sigma(value: Any) -> float:
    """SEG sigma from the form's text: a number > 0, or "inf" (math.inf, SEG's default: the mean query)."""
    name, allowed = "SEG sigma", "a number > 0, or inf (every query is the mean query)"
    text = "" if value is None else str(value).strip()
    if text == "":
        raise InputError(f"{name} is empty: enter {allowed}.")
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"{name} must be {allowed}, got {value!r}.") from None
    if not v > 0:  # NaN fails too
        shown = int(v) if math.isfinite(v) and v == int(v) else text
        raise InputError(f"{name} must be {allowed}, got {shown}.")
    return v


def validate(
    model: DemoModel,
    method: str,
    sag_scale: Any,
    pag_scale: Any,
    cfg_scale: Any,
    blur_sigma: Any,
    seg_scale: Any,
    seg_sigma: Any,
    tpg_scale: Any,
    slg_scale: Any,
    layer: Any,
    steps: Any,
    scheduler: Any,
    seed: Any,
    label: Any,
    prompt: Any,
    num_images: Any,
) -> Settings:
    """The form as :class:`Settings`, or :class:`InputError` with a message for the page."""
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    if scheduler not in SCHEDULER_NAMES:
        raise InputError(f"Unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULER_NAMES)}.")
    layer = (layer or "").strip() if isinstance(layer, str) else ""
    if layer not in model.layers:
        shown = ", ".join(model.layers)
        raise InputError(f"Unknown self-attention layer {layer!r}: this model has {shown}.")
    settings = Settings(
        method=method,
        sag_scale=_number("SAG scale", sag_scale),
        pag_scale=_number("PAG scale", pag_scale),
        cfg_scale=_number("CFG scale", cfg_scale),
        blur_sigma=_number("Blur sigma", blur_sigma),
        seg_scale=_number("SEG scale", seg_scale),
        seg_sigma=_seg_sigma(seg_sigma),
        tpg_scale=_number("TPG scale", tpg_scale),
        slg_scale=_number("SLG scale", slg_scale),
        layer=layer,
        steps=_number("Steps", steps, integer=True),
        scheduler=scheduler,
        seed=_number("Seed", seed, integer=True),
        label=str(label) if label is not None else "",
        prompt=str(prompt or ""),
        num_images=_number("Images", num_images, integer=True),
    )
    # Text models take any prompt (the empty one samples unconditionally); pixel models a class label.
    cfg = "cfg" in dropdown_terms(method)
    if model.pixel and model.num_classes is not None:
        if settings.label not in model.label_choices:
            raise InputError(f"Unknown class label {settings.label!r}: choose one of the list.")
        if cfg and settings.label == UNCONDITIONAL:
            raise InputError("CFG needs a class label: pick a digit or 'cycle', or a method without CFG.")
    elif model.pixel and cfg:
        raise InputError("This model is unconditional, so CFG is not available: pick a method without CFG.")
    return settings


# ---------------------------------------------------------------------------------------------- model
class DemoModel:
    """The pipeline, loaded once, and what the form offers for it."""

    def __init__(self, pipe):
        from ..engine.attention import default_sag_layer, self_attention_layers
        from ..pipelines import DDPMSAGPipeline

        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.pixel = isinstance(pipe, DDPMSAGPipeline)
        self.text = not self.pixel
        self.num_classes = pipe.num_classes if self.pixel else None
        self.layers = list(self_attention_layers(pipe.unet))
        self.default_layer = default_sag_layer(pipe.unet)
        real = (self.num_classes or 1) - 1  # the last class embedding is the null label
        self.label_choices = (
            [CYCLE, *[str(i) for i in range(real)], UNCONDITIONAL] if self.num_classes else []
        )

    def labels_for(self, s: Settings) -> list[int] | None:
        """The class label of each image (None: unconditional or a text model)."""
        if not self.num_classes or s.label == UNCONDITIONAL:
            return None
        real = self.num_classes - 1
        if s.label == CYCLE:
            return [i % real for i in range(s.num_images)]
        return [int(s.label)] * s.num_images

    def sample(
        self, s: Settings, arm: Arm, record_masks: bool, on_step: Callable[[int], None]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Images (N, H, W, 3 uint8) of one run and the SAG masks (N, h, w in [0, 1]) if recorded."""
        self.pipe.scheduler = scheduler_from_name(s.scheduler, self.base_scheduler_config)
        return sample_arm(
            self.pipe,
            arm,
            num_images=s.num_images,
            steps=s.steps,
            seed=s.seed,
            class_labels=self.labels_for(s),
            prompt=s.prompt,
            record_masks=record_masks,
            on_step=on_step,
            sag_layers=s.layer,
            pag_applied_layers=s.layer,
        )


# ---------------------------------------------------------------------------------------------- images
def tile(images: np.ndarray, columns: int = 2, pad: int = 4) -> Image.Image:
    """The images (N, H, W, 3 uint8) in a grid of ``columns``, upscaled (nearest) to about TILE_PIXELS."""
    n, h, w, _ = images.shape
    scale = max(1, TILE_PIXELS // max(h, w))
    h, w = h * scale, w * scale
    cols = min(columns, n)
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(
            Image.fromarray(img).resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad))
        )
    return canvas


# ---------------------------------------------------------------------------------------------- generate
def generate(model: DemoModel, *form: Any, progress: Callable | None = None):
    """Sample unguided and guided runs for the form; returns (unguided, guided, masks, status markdown).

    Never raises: bad input and sampling errors become a message in the status (images cleared).
    """
    try:
        s = validate(model, *form)
        arm = s.arm(s.method)
        total = 2 * s.steps
        t0 = time.perf_counter()

        def reporter(offset: int, desc: str) -> Callable[[int], None]:
            def on_step(i: int) -> None:
                if progress is not None:
                    progress(min(1.0, (offset + i) / total), desc=f"{desc}: step {min(i, s.steps)}/{s.steps}")

            return on_step

        reporter(0, "unguided")(0)
        base, _ = model.sample(s, s.arm("none"), False, reporter(0, "unguided"))
        guided, masks = model.sample(s, arm, arm.uses_attention_mask, reporter(s.steps, s.method))
        dt = time.perf_counter() - t0
        model_steps = len(model.pipe.scheduler.timesteps)  # the guidance windows' steps (Heun: 2N - 1)
    except ValueError as err:  # the form (InputError) or the pipeline's own argument checks
        return None, None, None, f"**Error:** {err}"
    except Exception as err:  # never a stack trace in the page; the server's console gets it
        traceback.print_exc()
        return None, None, None, f"**Error:** sampling failed ({type(err).__name__}: {err})."
    mask_img = tile(overlay_masks(guided, masks)) if masks is not None else None
    what = (
        f"labels {model.labels_for(s)}"
        if model.pixel and model.labels_for(s)
        else (f"prompt {s.prompt!r}" if model.text else "unconditional")
    )
    status = (
        f"Done in {dt:.1f} s: {s.num_images} images per run, seed {s.seed}, {s.steps} {s.scheduler} steps, "
        f"{what}. {guided_caption(s, arm, model_steps)}"
    )
    if masks is None:
        terms = dropdown_terms(s.method)
        if "blur" in terms:
            why = "blur guidance blurs the whole image"
        elif "sag" in terms:
            why = "SAG scale is 0"
        else:
            why = "the method has no SAG term"
        status += f" No attention mask: {why}."
    return tile(base), tile(guided), mask_img, status


def _on_steps(steps: list[int], num_steps: int) -> str:
    """The caption's ' on steps 2-5 of 25' for the 0-based steps [1, 2, 3, 4] of 25 (a window's steps are
    contiguous)."""
    if not steps:
        return ""
    first, last = steps[0] + 1, steps[-1] + 1
    return f" on step {first} of {num_steps}" if first == last else f" on steps {first}-{last} of {num_steps}"


def guided_caption(s: Settings, arm: Arm, model_steps: int) -> str:
    """What the guided run used: the scales of the method's own terms only (in the method's order), the
    layer where SAG or PAG use it, and SLG's steps, with a note when its step window holds none of them
    (SLG then changes nothing, which would otherwise look like a bug)."""
    terms = s.method.lower().split("+") if s.method != "none" else []
    slg_steps = [i for i in range(model_steps) if in_window(arm.slg_window, i, model_steps)]
    parts = {
        "cfg": f"CFG {arm.guidance_scale:g}",
        "sag": f"SAG {arm.sag_scale:g} with blur sigma {arm.sag_sigma:g}",
        "blur": f"blur {arm.sag_scale:g} with sigma {arm.sag_sigma:g}",
        "pag": f"PAG {arm.pag_scale:g}",
        "seg": f"SEG {arm.seg_scale:g} with sigma {s.seg_sigma:g}",
        "tpg": f"TPG {arm.tpg_scale:g}",
        "slg": f"SLG {arm.slg_scale:g}{_on_steps(slg_steps, model_steps)}",
    }
    used = ", ".join(parts[t] for t in terms) or "no guidance term, as the unguided run"
    if {"sag", "pag"} & set(terms):
        used += f", layer `{s.layer}`"
    caption = f"Guided: {s.method} ({used})."
    if "slg" in terms and not slg_steps:
        lo, hi = arm.slg_window
        steps = range(1, LIMITS["Steps"][1] + 1)
        enough = next(n for n in steps if any(in_window(arm.slg_window, i, n) for i in range(n)))
        caption += (
            f" SLG's step window ({lo:.0%}-{hi:.0%} of the steps) holds none of the {model_steps} steps, so"
            f" SLG changed nothing: take {enough} steps or more."
        )
    return caption


# ---------------------------------------------------------------------------------------------- app
def build_app(model: DemoModel):
    """The gradio Blocks app for ``model`` (gradio is imported here, after analytics are switched off)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    with gr.Blocks(title="attnguide demo", analytics_enabled=False) as app:
        gr.Markdown(
            "# attnguide: Self-Attention Guidance\n"
            "The same seeds sampled **without guidance** (left) and **with the chosen method** (right). "
            "The mask panel shows where SAG blurred (red: masked in more of the steps)."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                method = gr.Dropdown(list(METHODS), value="SAG", label="Method", elem_id="method")
                with gr.Row():
                    sag = gr.Number(value=0.75, label="SAG / blur scale", elem_id="sag_scale")
                    pag = gr.Number(value=1.0, label="PAG scale", elem_id="pag_scale")
                with gr.Row():
                    cfg = gr.Number(value=1.5, label="CFG scale", elem_id="cfg_scale")
                    sigma = gr.Number(value=1.0, label="Blur sigma", elem_id="blur_sigma")
                with gr.Row():
                    seg = gr.Number(value=3.0, label="SEG scale", elem_id="seg_scale")
                    # a Textbox: a gr.Number cannot hold inf, SEG's default (every query is the mean query)
                    seg_sigma = gr.Textbox(
                        value="inf",
                        label="SEG sigma (tokens > 0, or inf)",
                        lines=1,
                        max_lines=1,
                        elem_id="seg_sigma",
                    )
                with gr.Row():
                    tpg = gr.Number(value=0.2, label="TPG scale", elem_id="tpg_scale")
                    slg = gr.Number(value=1.0, label="SLG scale", elem_id="slg_scale")
                layer = gr.Dropdown(
                    model.layers,
                    value=model.default_layer,
                    label="Self-attention layer (SAG map, PAG perturbation)",
                    allow_custom_value=True,
                    elem_id="layer",
                )
                with gr.Row():
                    steps = gr.Number(value=25, precision=0, label="Steps", elem_id="steps")
                    sched = gr.Dropdown(
                        list(SCHEDULER_NAMES), value="ddim", label="Scheduler", elem_id="sched"
                    )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    count = gr.Number(value=4, precision=0, label="Images", elem_id="num_images")
                label = gr.Dropdown(
                    model.label_choices or [""],
                    value=model.label_choices[0] if model.label_choices else "",
                    label="Class label",
                    visible=bool(model.label_choices),
                    elem_id="label",
                )
                prompt = gr.Textbox(
                    value="a photo of a cat", label="Prompt", visible=model.text, elem_id="prompt"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("Press **Generate**.", elem_id="status")
                with gr.Row():
                    images = dict(
                        type="pil", format="png", interactive=False, buttons=["download", "fullscreen"]
                    )
                    out_base = gr.Image(label="Unguided", elem_id="unguided", **images)
                    out_guided = gr.Image(label="Guided", elem_id="guided", **images)
                    out_mask = gr.Image(label="SAG mask", elem_id="mask", **images)
                with gr.Accordion("Methods", open=False, elem_id="methods"):
                    gr.Markdown(METHODS_TABLE)

        def run(*form, progress=gr.Progress()):  # noqa: B008 (gradio's idiom for progress)
            return generate(model, *form, progress=progress)

        guidance = [sag, pag, cfg, sigma, seg, seg_sigma, tpg, slg]  # in the order of validate()'s arguments
        button.click(
            run,
            inputs=[method, *guidance, layer, steps, sched, seed, label, prompt, count],
            outputs=[out_base, out_guided, out_mask, status],
            concurrency_limit=1,
        )
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnguide demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="pipeline/model folder (default: bundled)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit('error: the demo needs gradio: pip install -e ".[demo]"') from None
    if not 0 < args.port < 65536:
        raise SystemExit(f"error: --port must be in 1..65535, got {args.port}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.model} on {device} ...", flush=True)
    model = DemoModel(load_pipeline(args.model, device))
    app = build_app(model)
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        inbrowser=False,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        footer_links=[],
        theme=gr.themes.Default(),  # gradio serves its fonts itself: nothing is fetched from outside
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
