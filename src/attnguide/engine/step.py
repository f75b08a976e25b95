"""The guided denoising step, shared by every pipeline.

A pipeline gathers its inputs into a *model function* ``model_fn(x, t, branches) -> output``: ``x`` is
``len(branches)`` chunks of the batch stacked on dim 0, and ``branches[i]`` ("cond" or "uncond") says
which conditioning chunk ``i`` gets. :class:`Guider` calls it once for the batchable terms
([uncond, cond, perturbed cond]) and once more for SAG's degraded input, and combines the outputs with
:mod:`attnguide.engine.guidance`. Any diffusers scheduler works: the guided output goes to ``scheduler.step``.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from torch import Tensor, nn

from .attention import (
    DEFAULT_MAP_LIMITS,
    GuidanceState,
    MapLimits,
    ProcessorSwap,
    default_pag_layers,
    default_sag_layer,
    install_guidance_processors,
    model_lock,
    resolve_layers,
)
from .blocks import BlockHooks, resolve_blocks, transformer_blocks
from .checks import check_eta, check_finite_output, check_latents, check_scale
from .cuda_graphs import CudaGraphPasses, ModelFn, graph_safe
from .degrade import (
    attention_mask,
    combine_attention_maps,
    highfreq_mask,
    infer_grid,
    random_mask,
    random_token_mask,
    square_mask,
)
from .guidance import (
    PAG,
    PERTURBATION_TERMS,
    SAG,
    SEG,
    SLG,
    TPG,
    ClassifierGuidance,
    classifier_shift,
    combine,
    in_window,
    rescale_cfg,
    sag_degraded_input,
)
from .layout import LatentLayout, as_images, from_images
from .parameterization import (
    PREDICTION_TYPES,
    NoiseLevel,
    is_flow_matching,
    noise_level,
    output_for_scheduler,
    predict_x0,
    scheduler_takes_variance,
    uses_sigma_schedule,
)

#: Denoisers that diffusers trains by flow matching (they predict a velocity).
FLOW_MODELS = frozenset(
    {"SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel", "SanaTransformer2DModelV2"}
)


#: diffusers' denoiser classes whose checkpoints are diffusion models (eps / v / x0 predictions).
DIFFUSION_MODELS = frozenset(
    {
        "UNet2DConditionModel",
        "UNet2DModel",
        "UNetMotionModel",
        "DiTTransformer2DModel",
        "PixArtTransformer2DModel",
        "HunyuanDiT2DModel",
    }
)


@dataclass
class StepOutputs:
    """The model outputs of one step (predictions without variance channels) and the term scales."""

    out_cond: Tensor
    out_uncond: Tensor | None = None
    variance: Tensor | None = None
    sag_ref: Tensor | None = None
    out_degraded: Tensor | None = None
    sag_scale: float = 0.0
    out_perturbed: Tensor | None = None
    pag_scale: float = 0.0
    #: the other perturbation terms' weak predictions and scales, by name ("seg", "tpg", "slg")
    weak: dict[str, tuple[Tensor, float]] = field(default_factory=dict)
    #: classifier guidance's addition to the guided prediction (engine.guidance.classifier_shift)
    classifier_shift: Tensor | None = None

    def combined(self, guidance_scale: float | None) -> Tensor:
        """:func:`combine` of these outputs: CFG at ``guidance_scale`` with the unconditional output
        (None: no CFG, the conditional prediction plus the terms), then every term whose output is here."""
        return combine(
            self.out_cond,
            out_uncond=None if guidance_scale is None else self.out_uncond,
            guidance_scale=1.0 if guidance_scale is None else guidance_scale,
            sag_ref=self.sag_ref,
            out_degraded=self.out_degraded,
            sag_scale=self.sag_scale,
            out_perturbed=self.out_perturbed,
            pag_scale=self.pag_scale,
            classifier_shift=self.classifier_shift,
            weak=self.weak,
        )

    def terms_delta(self) -> Tensor:
        """What the guidance terms here (not CFG) add to the conditional prediction."""
        return self.combined(None) - self.out_cond


class Guider:
    """Guidance for one sampling run: validates and installs the attention processors (as a context
    manager that always restores them) and computes the guided model output at each step.

    model: the denoiser module (UNet or transformer) whose self-attention layers are used.
    scheduler: any diffusers scheduler (its ``prediction_type`` unless ``prediction_type`` is given).
    guidance_scale: CFG weight w, or None for no CFG (the model function then only sees "cond").
    sag, pag: the terms, or None. seg, tpg, slg: the other perturbation terms (engine/guidance.py), or
    None; each adds its branch to the batched call. guidance_rescale: CFG rescale phi (diffusers'
    ``guidance_rescale``).
    classifier: classifier guidance (:class:`ClassifierGuidance`), or None: its gradient is taken once per
    step at this step's model input x_t (ADM), latent channels only, outside the denoiser's graph, and
    its shift is added once to the guided (CFG-combined, SAG, PAG) prediction; the SAG and PAG passes
    do not see it.
    record_masks: keep the sum of the SAG masks over the steps in ``mask_sum`` (paper Fig. 4).
    generator: randomness for the "random", "random_tokens" and "square" ablation masks.
    cuda_graphs: replay the model passes from CUDA graphs on a CUDA device (:class:`CudaGraphPasses`);
    the model function's own tensors must then stay fixed during the run (else call ``graphs.reset()``).
    map_limits: when a SAG map is computed memory-flat (:class:`attnguide.engine.attention.MapLimits`).
    layout: the model's :class:`LatentLayout` (latent / conditioning / variance channels); None reads it
    from the model's config (``in_channels``, ``out_channels``), or from the first pass's shapes.
    owner: the thread whose calls are guided (None: every thread's), read by callers such as
    ``attnguide.guide``. Threads share one installation: :meth:`passes` holds ``step_lock``, so the
    passes of concurrent steps take turns and never see each other's state.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        *,
        guidance_scale: float | None = None,
        sag: SAG | None = None,
        pag: PAG | None = None,
        seg: SEG | None = None,
        tpg: TPG | None = None,
        slg: SLG | None = None,
        classifier: ClassifierGuidance | None = None,
        guidance_rescale: float = 0.0,
        prediction_type: str | None = None,
        record_masks: bool = False,
        generator: torch.Generator | None = None,
        cuda_graphs: bool = False,
        map_limits: MapLimits = DEFAULT_MAP_LIMITS,
        layout: LatentLayout | None = None,
        owner: int | None = None,
    ):
        _check_guider_arguments(model, scheduler, sag, pag, generator, map_limits, record_masks, cuda_graphs)
        if classifier is not None and not isinstance(classifier, ClassifierGuidance):
            raise TypeError(
                "`classifier` must be an attnguide.engine.guidance.ClassifierGuidance (or None), "
                f"got {classifier!r}"
            )
        self.classifier = classifier if (classifier is not None and classifier.scale != 0) else None
        self.model = model
        self.scheduler = scheduler
        if guidance_scale is not None:
            guidance_scale = check_scale("guidance_scale", guidance_scale)
        self.guidance_scale = guidance_scale
        self.sag = sag if (sag is not None and sag.scale != 0) else None
        self.pag = pag if (pag is not None and pag.scale != 0) else None
        self.guidance_rescale = check_scale("guidance_rescale", guidance_rescale)
        flow = is_flow_matching(scheduler)
        default = "flow" if flow else getattr(scheduler.config, "prediction_type", "epsilon")
        ptype = prediction_type or default
        if ptype not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {ptype!r}")
        family = type(getattr(model, "_orig_mod", model)).__name__
        if family in FLOW_MODELS and not flow:
            raise ValueError(
                f"`scheduler`: {family} is a flow-matching model; {type(scheduler).__name__} is not a "
                "flow-matching scheduler (use FlowMatchEulerDiscreteScheduler or the pipeline's own)"
            )
        if family in DIFFUSION_MODELS and flow:
            raise ValueError(
                f"`scheduler`: {type(scheduler).__name__} is a flow-matching scheduler; {family} is a "
                "diffusion (eps / v / x0) model: use the scheduler it was trained with"
            )
        if flow != (ptype == "flow"):
            raise ValueError(
                f"`scheduler`: {type(scheduler).__name__} "
                + (
                    "is a flow-matching scheduler, which needs a velocity (prediction_type 'flow')"
                    if flow
                    else "is not a flow-matching scheduler, so prediction_type 'flow' does not fit it"
                )
                + f"; got prediction_type {ptype!r}"
            )
        self.prediction_type = ptype
        self.record_masks = record_masks
        self.map_limits = map_limits
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.mask_sum: Tensor | None = None
        self.mask_steps = 0  # steps whose mask is in mask_sum
        self.last_mask: Tensor | None = None
        self.owner = owner
        self.step_lock = threading.RLock()
        self.state = GuidanceState()
        # Resolve layers and layout now, so a bad name or an unplaceable model fails before any model
        # call. A torch.compile wrapper (``torch.compile(unet)``) is looked through.
        inner = getattr(model, "_orig_mod", model)
        self.layout = layout if layout is not None else config_layout(inner, scheduler)
        self.graphs = CudaGraphPasses(self.state) if cuda_graphs and graph_safe(inner) else None
        self.sag_layers: list[str] = []
        if self.sag is not None and self.sag.needs_map:
            names = self.sag.layers if self.sag.layers is not None else default_sag_layer(inner)
            self.sag_layers = resolve_layers(inner, names, argument="sag_layers")
        self.pag_layers: list[str] = []
        if self.pag is not None:
            names = self.pag.layers if self.pag.layers is not None else default_pag_layers(inner)
            self.pag_layers = resolve_layers(inner, names, argument="pag_applied_layers")
        self.weak = weak_terms(seg=seg, tpg=tpg, slg=slg)
        self.weak_layers = resolve_weak_layers(inner, self.weak)
        if "tpg" in self.weak:
            self.graphs = None  # a replayed graph would reuse one permutation
        self._swap = ProcessorSwap(inner)
        self._hooks = BlockHooks(inner, self.state, self.generator)
        self._lock = model_lock(inner)  # held from __enter__ to __exit__: one run at a time per model
        self._sigma_schedule: bool | None = None
        self._abar_table: Tensor | None = None

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale is not None

    def scales(self) -> dict[str, float | None]:
        """The scales of this run by their pipeline names (what a non-finite output is blamed on)."""
        return {
            "guidance_scale": self.guidance_scale,
            "sag_scale": self.sag.scale if self.sag is not None else None,
            "pag_scale": self.pag.scale if self.pag is not None else None,
            **{f"{name}_scale": term.scale for name, term in self.weak.items()},
            "classifier_scale": self.classifier.scale if self.classifier is not None else None,
            "guidance_rescale": self.guidance_rescale if self.do_cfg else None,
        }

    def check_output(self, output: Tensor) -> Tensor:
        """``output`` (a run's final sample) if it is finite (one host sync), else ValueError naming the
        scale that likely made it overflow."""
        return check_finite_output(output, self.scales())

    def guides_this_thread(self) -> bool:
        """Whether calls from the current thread are guided (see ``owner``). Inside a ``torch.compile``d
        model every call is (dynamo cannot read thread identities without a graph break)."""
        if self.owner is None or torch.compiler.is_compiling():
            return True
        return self.owner == threading.get_ident()

    def __enter__(self) -> Guider:
        self._lock.acquire()
        try:
            perturbed = {"pag": self.pag_layers}
            if "seg" in self.weak:
                perturbed["seg"] = self.weak_layers["seg"]
            install_guidance_processors(
                self._swap,
                self.state,
                self.sag_layers,
                perturbed,
                self.map_limits,
                seg_sigma=self.weak["seg"].sigma if "seg" in self.weak else math.inf,
            )
            self._hooks.install(self.weak_layers.get("tpg", []), self.weak_layers.get("slg", []))
        except BaseException:
            self._hooks.remove()
            self._swap.restore()
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._hooks.remove()
            self._swap.restore()
            self.state.maps.clear()
            if self.graphs is not None:
                self.graphs.reset()
        finally:
            self._lock.release()

    def _call_model(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str], inputs_key: tuple
    ) -> Tensor:
        if self.graphs is not None:
            return self.graphs(model_fn, x, t, branches, inputs_key)
        return model_fn(x, t, branches)

    # ------------------------------------------------------------------ one step
    def passes(
        self,
        model_fn: ModelFn,
        x_in: Tensor,
        t: Tensor,
        *,
        step: int = 0,
        num_steps: int = 1,
        inputs_key: tuple = (),
        cfg: bool | None = None,
        terms: frozenset[str] | None = None,
        image_tokens: int = 0,
    ) -> StepOutputs:
        """Run the model passes of one step on the model input ``x_in`` (after ``scale_model_input``):
        one batched call [uncond?, cond, perturbed cond?] and, for SAG, one call on the degraded input.
        ``cfg``: whether the model function has an "uncond" branch (default: ``guidance_scale`` given).
        ``terms``: the terms to run in this call ({"sag", "pag", "seg", "tpg", "slg"}; None: all), for
        pipelines that make the CFG branches in separate calls (SAG belongs to the unconditional one, the
        perturbation terms to the conditional).
        ``image_tokens``: the model call's image tokens, where a layer's sequence can also hold text
        tokens (:class:`GuidanceState`). ``inputs_key`` identifies the model function's own inputs for
        the CUDA-graph cache (tensors by address: a captured graph reads them there). Holds
        ``step_lock`` (threads take turns)."""
        run = (model_fn, x_in, t, step, num_steps, inputs_key, cfg, terms, image_tokens)
        if torch.compiler.is_compiling():  # traced into a compiled model: dynamo cannot enter a lock
            return self._passes(*run)
        with self.step_lock:
            return self._passes(*run)

    def _passes(
        self, model_fn, x_in, t, step, num_steps, inputs_key, cfg, terms, image_tokens
    ) -> StepOutputs:
        st = self.state
        do_cfg = self.do_cfg if cfg is None else cfg
        if self.layout is not None:
            self.layout.check_input(x_in)
        if self._sigma_schedule is None:
            self._sigma_schedule = uses_sigma_schedule(self.scheduler, self.scheduler.timesteps)
        b = x_in.shape[0]
        do_sag = self.sag is not None and in_window(self.sag.window, step, num_steps)
        do_pag = self.pag is not None and in_window(self.pag.window, step, num_steps)
        if terms is not None:
            do_sag, do_pag = do_sag and "sag" in terms, do_pag and "pag" in terms
        weak = [
            name
            for name, term in self.weak.items()
            if in_window(term.window, step, num_steps) and (terms is None or name in terms)
        ]
        perturbed = (["pag"] if do_pag else []) + weak
        branches = (["uncond"] if do_cfg else []) + ["cond"] + ["cond"] * len(perturbed)
        x_main = torch.cat([x_in] * len(branches)) if len(branches) > 1 else x_in
        st.maps.clear()
        first = len(branches) - len(perturbed)
        st.groups = {name: ((first + i) * b, (first + i + 1) * b) for i, name in enumerate(perturbed)}
        st.capture = do_sag and self.sag.needs_map
        st.capture_rows = b  # the map of the SAG reference branch, the first chunk, is all that is used
        st.batch_rows = x_main.shape[0]
        st.thread = None if torch.compiler.is_compiling() else threading.get_ident()
        st.image_tokens = image_tokens
        st.image_size = tuple(x_in.shape[-2:])
        try:
            out = self._call_model(model_fn, x_main, t, branches, inputs_key)
        finally:
            st.groups = {}
            st.capture = False
            st.capture_rows = 0
        layout = self.layout or LatentLayout.from_channels(
            x_in.shape[1], out.shape[1], variance=scheduler_takes_variance(self.scheduler)
        )
        preds, variances = zip(*(layout.split_output(c) for c in out.chunk(len(branches))), strict=True)
        i_cond = 1 if do_cfg else 0
        res = StepOutputs(
            out_cond=preds[i_cond],
            out_uncond=preds[0] if do_cfg else None,
            variance=variances[i_cond],
            out_perturbed=preds[first] if do_pag else None,
            pag_scale=self.pag.scale_at(t) if do_pag else 0.0,
            weak={name: (preds[first + perturbed.index(name)], self.weak[name].scale) for name in weak},
        )
        if do_sag:
            res.sag_ref = res.out_uncond if do_cfg else res.out_cond
            res.sag_scale = self.sag.scale
            x_deg = self._degraded_input(x_in, res.sag_ref, t, layout, st)
            st.batch_rows = b
            out_degraded = self._call_model(model_fn, x_deg, t, [branches[0]], inputs_key)
            res.out_degraded, _ = layout.split_output(out_degraded)
        if self.classifier is not None and in_window(self.classifier.window, step, num_steps):
            if terms is not None and "classifier" not in terms:
                raise ValueError(
                    "`classifier`: classifier guidance is not supported where the CFG branches come in "
                    "separate denoiser calls (cfg_layout 'separate', Flux's true CFG)"
                )
            res.classifier_shift = self._classifier_shift(x_in, t, layout)
        return res

    def _classifier_shift(self, x_in: Tensor, t: Tensor, layout: LatentLayout) -> Tensor:
        """Classifier guidance's shift of the prediction (:func:`classifier_shift`): the user's gradient at
        the model input's latent channels, taken on a detached copy under ``torch.enable_grad()`` (also
        inside ``torch.inference_mode``), so no gradient flows through or into the denoiser."""
        latent, _ = layout.split_input(x_in)
        with torch.inference_mode(False), torch.enable_grad():
            x = latent.detach().clone()
            tt = torch.as_tensor(t, device=x.device).reshape(-1)
            tt = (tt if tt.numel() == x.shape[0] else tt[:1]).expand(x.shape[0])
            grad = self.classifier.grad_fn(x, tt)
        if not isinstance(grad, Tensor) or tuple(grad.shape) != tuple(latent.shape):
            got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(
                f"`classifier`: grad_fn(x, t) must return grad_x log p(y | x_t) shaped like x "
                f"{tuple(latent.shape)}, got {got}"
            )
        table = self._alpha_table(t)
        level = noise_level(self.scheduler, t, sigma_schedule=self._sigma_schedule, table=table)
        shift = classifier_shift(grad.detach(), level, self.prediction_type, self.classifier.scale)
        return shift.to(dtype=latent.dtype)

    def _degraded_input(
        self, x_in: Tensor, ref: Tensor, t: Tensor, layout: LatentLayout, st: GuidanceState
    ) -> Tensor:
        """SAG's degraded model input (Alg. 1): the latent channels blurred under the mask frame by frame
        and re-noised with the reference prediction's own eps; conditioning channels kept."""
        latent, cond = layout.split_input(x_in)
        table = self._alpha_table(t)
        level = noise_level(self.scheduler, t, sigma_schedule=self._sigma_schedule, table=table)
        images, ref_images = as_images(latent), as_images(ref)
        mask = self._mask(images, ref_images, level, st)
        degraded = sag_degraded_input(
            images,
            ref_images,
            level,
            self.prediction_type,
            mask,
            self.sag.blur_kernel_size,
            self.sag.blur_sigma,
            blur=self.sag.blur,
        )
        return layout.join_input(from_images(degraded, latent), cond)

    def __call__(
        self, model_fn: ModelFn, sample: Tensor, t: Tensor, *, step: int = 0, num_steps: int = 1
    ) -> Tensor:
        """The guided model output for ``sample`` at timestep ``t`` (to hand to ``scheduler.step``).

        With a learned variance, the variance channels of the conditional pass are kept.
        """
        scale = getattr(self.scheduler, "scale_model_input", None)  # flow-matching schedulers have none
        x_in = scale(sample, t) if scale is not None else sample
        return self.guided_output(self.passes(model_fn, x_in, t, step=step, num_steps=num_steps))

    def guided_output(self, r: StepOutputs) -> Tensor:
        """The guided model output of one step's passes ``r``: the terms combined with this run's CFG
        weight and rescale, the conditional pass's variance channels appended where the model has them."""
        guided = r.combined(self.guidance_scale if self.do_cfg else 1.0)
        if self.do_cfg and self.guidance_rescale > 0.0:
            guided = rescale_cfg(guided, r.out_cond, self.guidance_rescale)
        return guided if r.variance is None else torch.cat([guided, r.variance], dim=1)

    def _alpha_table(self, t: Tensor) -> Tensor | None:
        """``alphas_cumprod`` on the device of ``t``, copied once per run."""
        table = getattr(self.scheduler, "alphas_cumprod", None)
        if not isinstance(t, Tensor) or table is None or self._sigma_schedule:
            return None
        if self._abar_table is None or self._abar_table.device != t.device:
            self._abar_table = table.to(device=t.device)
        return self._abar_table

    # ------------------------------------------------------------------ masks
    def _mask(self, images: Tensor, ref: Tensor, level: NoiseLevel, st: GuidanceState) -> Tensor:
        """M of Eq. 14 for the SAG reference branch's images (frames of a video: one row each), shape
        (B, 1, H, W). The "random_tokens" mask takes only the token grid of the captured map (with
        several SAG layers, the finest grid)."""
        b, size = images.shape[0], tuple(images.shape[-2:])
        kind = self.sag.mask
        opts = {"device": images.device, "dtype": images.dtype}
        if kind in ("attention", "random_tokens"):
            maps = []
            for name in self.sag_layers:
                if name not in st.maps:
                    raise RuntimeError(f"SAG layer {name!r} was not called during the model pass")
                agg, grid = st.maps[name]
                if agg.shape[0] != b:
                    raise ValueError(
                        f"`sag_layers`: layer {name!r} saw {agg.shape[0]} rows for {b} images; choose a "
                        "spatial self-attention layer (not a temporal one)"
                    )
                maps.append((agg, grid if grid is not None else infer_grid(agg.shape[1], *size)))
            if kind == "random_tokens":
                grid = max((g for _, g in maps), key=lambda g: g[0] * g[1])
                mask = random_token_mask((b, 1, *size), grid, self.sag.mask_fraction, self.generator)
                mask = mask.to(**opts)
            elif len(maps) == 1:
                mask = attention_mask(maps[0][0], maps[0][1], size, self.sag.threshold)
            else:
                mask = (combine_attention_maps(maps, size) > self.sag.threshold).to(maps[0][0].dtype)
        elif kind == "global":
            mask = torch.ones((b, 1, *size), **opts)
        elif kind == "random":
            mask = random_mask((b, 1, *size), self.sag.mask_fraction, self.generator).to(**opts)
        elif kind == "square":
            mask = square_mask((b, 1, *size), self.sag.mask_fraction, self.generator).to(**opts)
        else:  # highfreq
            mask = highfreq_mask(predict_x0(images, ref, level, self.prediction_type), self.sag.mask_fraction)
        if self.record_masks:
            m = mask.detach().float()
            self.last_mask = m
            self.mask_sum = m if self.mask_sum is None else self.mask_sum + m
            self.mask_steps += 1
        return mask


def _check_guider_arguments(
    model, scheduler, sag, pag, generator, map_limits, record_masks, cuda_graphs
) -> None:
    """TypeError for the objects a :class:`Guider` takes that are not of their kind."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a UNet or transformer), got {model!r}")
    needed = ("config", "set_timesteps", "step")  # flow-matching schedulers have no scale_model_input
    missing = [a for a in needed if not hasattr(scheduler, a)]
    if missing:
        raise TypeError(
            f"`scheduler` must be a diffusers scheduler (config, set_timesteps, step), "
            f"got {type(scheduler).__name__} without {', '.join(missing)}"
        )
    if sag is not None and not isinstance(sag, SAG):
        raise TypeError(f"`sag` must be an attnguide.SAG (or None), got {sag!r}")
    if pag is not None and not isinstance(pag, PAG):
        raise TypeError(f"`pag` must be an attnguide.PAG (or None), got {pag!r}")
    for name, flag in (("record_masks", record_masks), ("cuda_graphs", cuda_graphs)):
        if not isinstance(flag, bool):
            raise ValueError(f"`{name}` must be True or False, got {flag!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator (or None), got {generator!r}")
    if not isinstance(map_limits, MapLimits):
        raise TypeError(f"`map_limits` must be an attnguide.engine.attention.MapLimits, got {map_limits!r}")


def config_layout(model: nn.Module, scheduler) -> LatentLayout | None:
    """The :class:`LatentLayout` that ``model``'s config gives (``in_channels``, ``out_channels``), or
    None for a model without one (then the first pass's shapes give it). ValueError where the channels
    cannot be placed, before any model call."""
    config = getattr(model, "config", None)
    in_ch = getattr(config, "in_channels", None)
    if not isinstance(in_ch, int):
        return None
    out_ch = model.__dict__.get("out_channels")  # transformers set it (learned sigma); UNets: the config
    if not isinstance(out_ch, int):
        out_ch = getattr(config, "out_channels", None)
    out_ch = out_ch if isinstance(out_ch, int) else in_ch
    return LatentLayout.from_channels(in_ch, out_ch, variance=scheduler_takes_variance(scheduler))


def scheduler_step_kwargs(scheduler, generator: torch.Generator | list | None, eta: float) -> dict:
    """The ``generator`` and ``eta`` keywords that this scheduler's ``step`` accepts."""
    check_eta(eta)
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict = {}
    if "generator" in params:
        out["generator"] = generator
    if "eta" in params:
        out["eta"] = eta
    return out


def sample_loop(
    guider: Guider,
    model_fn: ModelFn,
    latents: Tensor,
    *,
    extra_step_kwargs: dict | None = None,
    progress: Callable | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    check_output: bool = True,
) -> Tensor:
    """Denoise ``latents`` over ``guider.scheduler.timesteps`` (set them first) with guidance at every step.

    The loop of every non-SD pipeline and of bare denoiser + scheduler use: guided output, then
    ``scheduler.step``. ``progress`` wraps the timestep iterable (a tqdm-like callable);
    ``callback(i, t, latents)`` runs after each step. ``latents`` must be a finite floating-point tensor;
    with ``check_output`` the result is checked once at the end (:meth:`Guider.check_output`: a
    ValueError naming the likely scale instead of NaN samples).
    """
    if not isinstance(guider, Guider):
        raise TypeError(f"`guider` must be an attnguide.Guider, got {type(guider).__name__}")
    if not callable(model_fn):
        raise TypeError(f"`model_fn` must be a function model_fn(x, t, branches), got {model_fn!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable or None, got {callback!r}")
    check_latents("latents", latents)
    if latents.ndim not in (4, 5):
        raise ValueError(
            f"`latents` must be (B, C, H, W) or (B, C, F, H, W), got shape {tuple(latents.shape)}"
        )
    scheduler = guider.scheduler
    timesteps = scheduler.timesteps
    steps = progress(timesteps) if progress is not None else timesteps
    channels = latents.shape[1]
    with guider:
        for i, t in enumerate(steps):
            out = guider(model_fn, latents, t, step=i, num_steps=len(timesteps))
            out = output_for_scheduler(out, channels, scheduler)
            latents = scheduler.step(out, t, latents, **(extra_step_kwargs or {}), return_dict=False)[0]
            if callback is not None:
                callback(i, t, latents)
    return guider.check_output(latents) if check_output else latents


def weak_terms(**terms: SEG | TPG | SLG | None) -> dict[str, SEG | TPG | SLG]:
    """The perturbation terms beside PAG that run (scale not 0), by name; TypeError for a wrong type."""
    out = {}
    for name, term in terms.items():
        kind = PERTURBATION_TERMS[name]
        if term is not None and not isinstance(term, kind):
            raise TypeError(f"`{name}` must be an attnguide.{kind.__name__} (or None), got {term!r}")
        if term is not None and term.scale != 0:
            out[name] = term
    return out


def resolve_weak_layers(model: nn.Module, terms: dict[str, SEG | TPG | SLG]) -> dict[str, list[str]]:
    """The layers (SEG: attention layers) and blocks (TPG, SLG) of each term, defaults filled in;
    ValueError before any model call where a name matches nothing or SEG meets linear attention."""
    out: dict[str, list[str]] = {}
    if "seg" in terms:
        seg = terms["seg"]
        names = seg.layers if seg.layers is not None else default_pag_layers(model)
        out["seg"] = resolve_layers(model, names, argument="seg_layers")
        modules = dict(model.named_modules())
        linear = [n for n in out["seg"] if isinstance(modules[n].processor, SanaLinearAttnProcessor2_0)]
        if linear:
            raise ValueError(
                f"`seg`: SEG blurs softmax-attention queries; {', '.join(linear)} use linear attention "
                "(Sana), which has no such energy: use PAG, TPG or SLG there"
            )
    for name, argument in (("tpg", "tpg_layers"), ("slg", "slg_layers")):
        if name in terms:
            layers = terms[name].layers
            out[name] = resolve_blocks(
                model, layers if layers is not None else default_blocks(model, name), argument=argument
            )
    return out


def default_blocks(model: nn.Module, term: str) -> list[int | str]:
    """TPG's default: the blocks that hold PAG's default layers; SLG's: diffusers' recommended SD3.5
    blocks 7, 8, 9 where the model has them, else the mid block's (UNets), else the middle block."""
    blocks = list(transformer_blocks(model))
    if term == "slg":
        wanted = [f"transformer_blocks.{i}" for i in (7, 8, 9)]
        mid = [b for b in blocks if b.startswith("mid_block.")]
        return wanted if all(w in blocks for w in wanted) else mid or [blocks[len(blocks) // 2]]
    parents = {name.rsplit(".", 1)[0] for name in default_pag_layers(model)}
    return [b for b in blocks if b in parents] or [blocks[len(blocks) // 2]]
