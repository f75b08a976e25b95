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
import dataclasses
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine.terms import REGISTRY, AppParam, Term, in_window
from ..pipelines.schedulers import SCHEDULER_NAMES, scheduler_from_name
from .arms import ALONE_METHODS, METHOD_TERMS, Arm
from .defaults import CFG_DEFAULT, CFG_RANGE, DEMO_MAX_IMAGES, NUM_IMAGES, SCHEDULER, SEED, STEPS
from .images import overlay_masks
from .loading import BUNDLED_MODEL, load_pipeline, sample_arm
from .train.datasets import model_class_names


# The method dropdown: each method of the registry alone (its term's title in capitals, "blur" as it is),
# CFG alone and with each, SAG + PAG with and without CFG, and none.
def _display(method: str) -> str:
    return method.upper() if method == METHOD_TERMS[method][0].name else method


METHODS = (
    *(_display(m) for m in ALONE_METHODS),
    "CFG",
    *(f"CFG+{_display(m)}" for m in METHOD_TERMS),
    "SAG+PAG",
    "CFG+SAG+PAG",
    "none",
)
#: The form's fields of the terms' settings (the registry's settings with a demo label), in registry
#: order: (Settings field, the term class, the setting); their ranges are the CLI's.
TERM_FIELDS: tuple[tuple[str, type[Term], AppParam], ...] = tuple(
    (f"{cls.name}_{p.name}", cls, p) for cls in REGISTRY for p in cls.app.params if p.label
)
LIMITS = {  # name -> (minimum, maximum), inclusive; the terms' settings are checked by their AppParam
    "CFG scale": CFG_RANGE,
    "Steps": (1, 1000),
    "Seed": (0, 2**32 - 1),
    "Images": (1, DEMO_MAX_IMAGES),
}
#: The form, in the order of :func:`validate`'s arguments after the model (gradio passes them so).
FORM_FIELDS = (
    "method",
    "cfg_scale",
    *(name for name, _, _ in TERM_FIELDS),
    "layer",
    "steps",
    "scheduler",
    "seed",
    "label",
    "prompt",
    "num_images",
)
UNCONDITIONAL = "unconditional (null label)"
CYCLE = "cycle (one label per image)"
TILE_PIXELS = 112  # small images are upscaled (nearest) to about this size, so 28x28 images are visible


def _defaults_cell(cls: type[Term]) -> str:
    """The "defaults here" cell of a term: its form fields' defaults, why they differ from the library's,
    and its step window where it has one of its own."""
    parts = []
    for _, owner, p in TERM_FIELDS:
        if owner is cls:
            value = "inf" if p.app_default == math.inf else str(float(p.app_default))
            parts.append(f"{p.label} {value}" + (f" ({p.why})" if p.why else ""))
    window = next((p.default for p in cls.app.params if p.name == "window"), (0.0, 1.0))
    if tuple(window) != (0.0, 1.0):
        parts.append(f"window {window[0] * 100:g}-{window[1] * 100:g} % of the steps")
    return ", ".join(parts)


def _methods_table() -> str:
    """The "Methods" accordion: one row per method of the dropdown (generated from the registry): the
    terms, CFG, then the CFG rules (each replaces CFG's combination; their "weak prediction" is the rule)."""
    rows, rules = [], []
    for method, (cls, _) in METHOD_TERMS.items():
        spec = cls.app.methods.get(method)
        title, where = (cls.title, cls.paper) if spec is None else (spec.title, spec.cite)
        weak = cls.app.weak if spec is None else spec.weak
        row = f"| {title} ({where}) | {weak} | {cls.app.passes} | {_defaults_cell(cls)} |"
        (rules if cls.app.needs_cfg else rows).append(row)
    cfg = (
        "| CFG | the unconditional prediction (the null label; text models: the empty prompt) | +1 row block "
        f"| CFG scale {CFG_DEFAULT} (the CLI's: w = 3 distorts the bundled model's samples) |"
    )
    return "\n".join([*rows, cfg, *rules])


# The "Methods" accordion of the page: one row per term of the dropdown, with the demo's own defaults,
# which follow `attnguide sample`'s.
METHODS_TABLE = (
    "Each term pushes the prediction away from a weaker one: out += s (ref - weak) at its scale s, where ref "
    "is the conditional prediction c (SAG and blur guidance with CFG: the unconditional u, as diffusers); "
    "CFG is out = u + w (c - u). Combined methods add their terms. A *row block* is more rows in the one "
    "batched model call of a step (a bigger batch, no extra call); SAG and blur guidance need a call of "
    "their own, because their input differs. The terms other than SAG and PAG act on the model's default "
    "layers, not on the layer field.\n\n"
    "| method | the weak prediction | model passes per step | defaults here |\n"
    "|---|---|---|---|\n" + _methods_table() + "\n"
)


class InputError(ValueError):
    """A form value that cannot be used; its message is shown in the page."""


class _SettingsMethods:
    """The methods of :class:`Settings`."""

    def arm(self, method: str) -> Arm:
        """The arm of a method of the dropdown, with the form's scales and the terms' other settings (a
        method's scale is its term's scale field: "blur" runs at the SAG scale)."""
        options: dict[str, Any] = {}
        for name, cls, p in TERM_FIELDS:
            value = getattr(self, name)
            if p.name == "scale":
                options.update({f"{m}_scale": value for m in cls.methods()})
            else:
                options[name] = None if (p.inf_allowed and math.isinf(value)) else value
        return Arm.from_terms(dropdown_terms(method), name=method, cfg_scale=self.cfg_scale, **options)


Settings = dataclasses.make_dataclass(
    "Settings",
    [
        ("method", str),
        ("cfg_scale", float),
        *((name, float) for name, _, _ in TERM_FIELDS),
        ("layer", str),
        ("steps", int),
        ("scheduler", str),
        ("seed", int),
        ("label", str),
        ("prompt", str),
        ("num_images", int),
    ],
    bases=(_SettingsMethods,),
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "The validated form (settings of infinite value: math.inf).",
    },
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


def _setting(p: AppParam, value: Any) -> float:
    """A term's setting from the form (a number, or the text of one that takes inf): a number in its
    range, the CLI's, or "inf" (math.inf) where it takes inf."""
    name, allowed = p.label, p.allowed()
    text = "" if value is None else str(value).strip()
    if text == "":
        raise InputError(f"{name} is empty: enter {allowed}.")
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"{name} must be {allowed}, got {value!r}.") from None
    if not p.accepts(v):  # NaN fails too
        shown = int(v) if math.isfinite(v) and v == int(v) else text
        raise InputError(f"{name} must be {allowed}, got {shown}.")
    return v


def validate(model: DemoModel, *form: Any) -> Settings:
    """The form (its values in :data:`FORM_FIELDS` order) as :class:`Settings`, or :class:`InputError`
    with a message for the page."""
    if len(form) != len(FORM_FIELDS):
        raise InputError(f"The form has {len(form)} values, not {len(FORM_FIELDS)}.")
    f = dict(zip(FORM_FIELDS, form, strict=True))
    method, scheduler = f["method"], f["scheduler"]
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    if method in model.unavailable:
        raise InputError(f"{method} cannot run on this model: {model.unavailable[method]}.")
    if scheduler not in SCHEDULER_NAMES:
        raise InputError(f"Unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULER_NAMES)}.")
    layer = f["layer"].strip() if isinstance(f["layer"], str) else ""
    if layer not in model.layers:
        shown = ", ".join(model.layers)
        raise InputError(f"Unknown self-attention layer {layer!r}: this model has {shown}.")
    terms = {name: _setting(p, f[name]) for name, _, p in TERM_FIELDS}
    settings = Settings(
        method=method,
        cfg_scale=_number("CFG scale", f["cfg_scale"]),
        **terms,
        layer=layer,
        steps=_number("Steps", f["steps"], integer=True),
        scheduler=scheduler,
        seed=_number("Seed", f["seed"], integer=True),
        label=str(f["label"]) if f["label"] is not None else "",
        prompt=str(f["prompt"] or ""),
        num_images=_number("Images", f["num_images"], integer=True),
    )
    # Text models take any prompt (the empty one samples unconditionally); pixel models a class label.
    cfg = "cfg" in dropdown_terms(method)
    if model.pixel and model.num_classes is not None:
        if settings.label not in model.label_choices:
            raise InputError(f"Unknown class label {settings.label!r}: choose one of the list.")
        if cfg and settings.label == UNCONDITIONAL:
            raise InputError("CFG needs a class label: pick a class or 'cycle', or a method without CFG.")
    elif model.pixel and cfg:
        raise InputError("This model is unconditional, so CFG is not available: pick a method without CFG.")
    return settings


# ---------------------------------------------------------------------------------------------- model
def _refusal(denoiser: Any, method: str) -> str | None:
    """Why the terms of a dropdown method cannot act on ``denoiser`` (None: they can)."""
    from ..engine.step import place_terms

    arm = Arm.from_terms(dropdown_terms(method), cfg_scale=CFG_DEFAULT)
    try:
        place_terms(denoiser, arm.engine_terms())
    except ValueError as err:
        return str(err).splitlines()[0].replace("`", "")
    return None


class DemoModel:
    """The pipeline, loaded once, and what the form offers for it; ``class_names``: the names of its
    class labels, where the model says (its training record), shown beside the numbers."""

    def __init__(self, pipe, class_names: Sequence[str] | None = None):
        from ..engine.layers import default_sag_layer, self_attention_layers
        from ..pipelines import DDPMSAGPipeline

        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.pixel = isinstance(pipe, DDPMSAGPipeline)
        self.text = not self.pixel
        self.num_classes = pipe.num_classes if self.pixel else None
        self.layers = list(self_attention_layers(pipe.unet))
        self.default_layer = default_sag_layer(pipe.unet)
        #: the methods whose terms cannot act on this model, and why (the engine's refusal)
        self.unavailable = {m: why for m in METHODS if (why := _refusal(pipe.unet, m)) is not None}
        self.methods = [m for m in METHODS if m not in self.unavailable]
        real = (self.num_classes or 1) - 1  # the last class embedding is the null label
        named = (
            class_names is not None
            and len(class_names) == real
            and list(class_names) != [str(i) for i in range(real)]
        )
        choices = [f"{i}: {class_names[i]}" if named else str(i) for i in range(real)]
        self.label_choices = [CYCLE, *choices, UNCONDITIONAL] if self.num_classes else []

    def labels_for(self, s: Settings) -> list[int] | None:
        """The class label of each image (None: unconditional or a text model)."""
        if not self.num_classes or s.label == UNCONDITIONAL:
            return None
        real = self.num_classes - 1
        if s.label == CYCLE:
            return [i % real for i in range(s.num_images)]
        return [int(s.label.split(":")[0])] * s.num_images

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


def _window_steps(window: tuple[float, float], model_steps: int) -> list[int]:
    return [i for i in range(model_steps) if in_window(tuple(window), i, model_steps)]


def _term_caption(s: Settings, arm: Arm, method: str, model_steps: int) -> tuple[str, str]:
    """A method's part of the caption ("SAG 0.75 with blur sigma 1", "SLG 1 on step 2 of 6") and, where
    its own step window holds none of the run's steps, a note saying so (else "")."""
    cls, _ = METHOD_TERMS[method]
    text = f"{cls.title if method == cls.name else method} {getattr(arm, f'{cls.name}_scale'):g}"
    for name, owner, p in TERM_FIELDS:
        if owner is cls and p.name != "scale":
            text += f" with {p.caption.removeprefix(method + ' ')} {getattr(s, name):g}"
    window = getattr(arm, f"{cls.name}_window", (0.0, 1.0))
    if tuple(window) == (0.0, 1.0):
        return text, ""
    steps = _window_steps(window, model_steps)
    if steps:
        return text + _on_steps(steps, model_steps), ""
    lo, hi = window
    enough = next(n for n in range(1, LIMITS["Steps"][1] + 1) if _window_steps(window, n))
    note = (
        f" {cls.title}'s step window ({lo:.0%}-{hi:.0%} of the steps) holds none of the {model_steps} steps, "
        f"so {cls.title} changed nothing: take {enough} steps or more."
    )
    return text, note


def guided_caption(s: Settings, arm: Arm, model_steps: int) -> str:
    """What the guided run used: the scales of the method's own terms only (in the method's order), the
    layer where SAG or PAG use it, and the steps of a term with a step window of its own, with a note when
    its window holds none of them (the term then changes nothing, which would otherwise look like a bug)."""
    terms = s.method.lower().split("+") if s.method != "none" else []
    parts, notes = [], []
    for t in terms:
        if t == "cfg":
            parts.append(f"CFG {arm.guidance_scale:g}")
            continue
        text, note = _term_caption(s, arm, t, model_steps)
        parts.append(text)
        notes.append(note)
    used = ", ".join(parts) or "no guidance term, as the unguided run"
    if {"sag", "pag"} & set(terms):
        used += f", layer `{s.layer}`"
    return f"Guided: {s.method} ({used})." + "".join(notes)


# ---------------------------------------------------------------------------------------------- app
def _field(gr: Any, cls: type[Term], p: AppParam) -> Any:
    """The form field of a term's setting: a number, or a one-line text box for a setting that takes inf
    (a gr.Number cannot hold it); a scale's label names every method that runs at it ("SAG / blur")."""
    elem_id = f"{cls.name}_{p.name}"
    if p.inf_allowed:
        default = "inf" if p.app_default == math.inf else str(p.app_default)
        label = f"{p.label} ({'>' if p.low_open else '>='} {p.low:g}, or inf)"
        return gr.Textbox(value=default, label=label, lines=1, max_lines=1, elem_id=elem_id)
    label = p.label
    if p.name == "scale" and len(cls.methods()) > 1:
        label = " / ".join([cls.title, *(m for m in cls.methods() if m != cls.name)]) + " scale"
    return gr.Number(value=p.app_default, label=label, elem_id=elem_id)


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
                method = gr.Dropdown(model.methods, value="SAG", label="Method", elem_id="method")
                cfg = gr.Number(value=CFG_DEFAULT, label="CFG scale", elem_id="cfg_scale")
                fields = [_field(gr, cls, p) for _, cls, p in TERM_FIELDS]
                layer = gr.Dropdown(
                    model.layers,
                    value=model.default_layer,
                    label="Self-attention layer (SAG map, PAG perturbation)",
                    allow_custom_value=True,
                    elem_id="layer",
                )
                with gr.Row():
                    steps = gr.Number(value=STEPS, precision=0, label="Steps", elem_id="steps")
                    sched = gr.Dropdown(
                        list(SCHEDULER_NAMES), value=SCHEDULER, label="Scheduler", elem_id="sched"
                    )
                with gr.Row():
                    seed = gr.Number(value=SEED, precision=0, label="Seed", elem_id="seed")
                    count = gr.Number(value=NUM_IMAGES, precision=0, label="Images", elem_id="num_images")
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

        button.click(
            run,
            inputs=[method, cfg, *fields, layer, steps, sched, seed, label, prompt, count],  # FORM_FIELDS
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
    model = DemoModel(load_pipeline(args.model, device), model_class_names(args.model))
    app = build_app(model)
    print(f"open http://{args.host}:{args.port} in a browser (Ctrl+C stops the demo)", flush=True)
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        quiet=True,  # gradio's own lines (its share-link hint among them) would repeat ours
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
