"""The guided denoising step, shared by every pipeline.

A pipeline gathers its inputs into a *model function* ``model_fn(x, t, branches) -> output``: ``x`` is
``len(branches)`` chunks of the batch stacked on dim 0, and ``branches[i]`` ("cond" or "uncond") says
which conditioning chunk ``i`` gets. :class:`Guider` calls it once for the batchable terms
([uncond, cond, perturbed cond]) and once more for SAG's degraded input, and combines the outputs with
:mod:`attnguide.guidance`. Any diffusers scheduler works: the guided output goes to ``scheduler.step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import (
    GuidanceState,
    ProcessorSwap,
    default_sag_layer,
    install_guidance_processors,
    resolve_layers,
)
from .degrade import (
    attention_mask,
    combine_attention_maps,
    highfreq_mask,
    infer_grid,
    random_mask,
    square_mask,
)
from .guidance import PAG, SAG, combine, in_window, rescale_cfg, sag_degraded_input
from .parameterization import (
    PREDICTION_TYPES,
    alpha_bar_at,
    output_for_scheduler,
    predict_x0,
    split_learned_variance,
    uses_sigma_schedule,
)

ModelFn = Callable[[Tensor, Tensor, Sequence[str]], Tensor]


@dataclass
class StepOutputs:
    """The model outputs of one step (predictions without variance channels) and the term scales."""

    out_cond: Tensor
    out_uncond: Tensor | None = None
    variance: Tensor | None = None
    sag_ref: Tensor | None = None
    out_sag: Tensor | None = None
    sag_scale: float = 0.0
    out_ptb: Tensor | None = None
    pag_scale: float = 0.0


class Guider:
    """Guidance for one sampling run: validates and installs the attention processors (as a context
    manager that always restores them) and computes the guided model output at each step.

    model: the denoiser module (UNet or transformer) whose self-attention layers are used.
    scheduler: any diffusers scheduler (its ``prediction_type`` unless ``prediction_type`` is given).
    guidance_scale: CFG weight w, or None for no CFG (the model function then only sees "cond").
    sag, pag: the terms, or None. guidance_rescale: CFG rescale phi (diffusers' ``guidance_rescale``).
    record_masks: keep the sum of the SAG masks over the steps in ``mask_sum`` (paper Fig. 4).
    generator: randomness for the "random" and "square" ablation masks.
    cuda_graphs: replay the model passes from CUDA graphs on a CUDA device (:class:`CudaGraphPasses`);
    the model function's own tensors must then stay fixed during the run (else call ``graphs.reset()``).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        *,
        guidance_scale: float | None = None,
        sag: SAG | None = None,
        pag: PAG | None = None,
        guidance_rescale: float = 0.0,
        prediction_type: str | None = None,
        record_masks: bool = False,
        generator: torch.Generator | None = None,
        cuda_graphs: bool = False,
    ):
        self.model = model
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.sag = sag if (sag is not None and sag.scale != 0) else None
        self.pag = pag if (pag is not None and pag.scale != 0) else None
        self.guidance_rescale = guidance_rescale
        if "FlowMatch" in type(scheduler).__name__ or getattr(scheduler.config, "use_flow_sigmas", False):
            raise ValueError(
                f"`scheduler`: {type(scheduler).__name__} is a flow-matching scheduler; attnguide guides "
                "eps / v / x0-predicting diffusion models"
            )
        ptype = prediction_type or getattr(scheduler.config, "prediction_type", "epsilon")
        if ptype not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {ptype!r}")
        self.prediction_type = ptype
        self.record_masks = record_masks
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.mask_sum: Tensor | None = None
        self.mask_steps = 0  # steps whose mask is in mask_sum
        self.last_mask: Tensor | None = None
        self.state = GuidanceState()
        # Resolve layers now, so a bad name fails before any model call. A torch.compile wrapper
        # (``torch.compile(unet)``) is looked through, so layer paths read as in the plain model.
        inner = getattr(model, "_orig_mod", model)
        self.graphs = CudaGraphPasses(self.state) if cuda_graphs and _graph_safe(inner) else None
        self.sag_layers: list[str] = []
        if self.sag is not None and self.sag.needs_map:
            names = self.sag.layers if self.sag.layers is not None else default_sag_layer(inner)
            self.sag_layers = resolve_layers(inner, names, argument="sag_layers")
        self.pag_layers: list[str] = (
            resolve_layers(inner, self.pag.layers, argument="pag_applied_layers")
            if self.pag is not None
            else []
        )
        self._swap = ProcessorSwap(inner)
        self._sigma_schedule: bool | None = None
        self._abar_table: Tensor | None = None

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale is not None

    def __enter__(self) -> Guider:
        try:
            install_guidance_processors(self._swap, self.state, self.sag_layers, self.pag_layers)
        except BaseException:
            self._swap.restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._swap.restore()
        self.state.maps.clear()
        if self.graphs is not None:
            self.graphs.reset()

    def _run(self, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str]) -> Tensor:
        if self.graphs is not None:
            return self.graphs(model_fn, x, t, branches)
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
    ) -> StepOutputs:
        """Run the model passes of one step on the model input ``x_in`` (after ``scale_model_input``):
        one batched call [uncond?, cond, perturbed cond?] and, for SAG, one call on the degraded input."""
        if self._sigma_schedule is None:
            self._sigma_schedule = uses_sigma_schedule(self.scheduler, self.scheduler.timesteps)
        b, channels = x_in.shape[0], x_in.shape[1]
        do_sag = self.sag is not None and in_window(self.sag.window, step, num_steps)
        do_pag = self.pag is not None and in_window(self.pag.window, step, num_steps)

        branches = (["uncond"] if self.do_cfg else []) + ["cond"] + (["cond"] if do_pag else [])
        x_main = torch.cat([x_in] * len(branches)) if len(branches) > 1 else x_in
        st = self.state
        st.maps.clear()
        st.perturbed_rows = b if do_pag else 0
        st.capture = do_sag and self.sag.needs_map
        st.capture_rows = b  # the map of the SAG reference branch, the first chunk, is all that is used
        try:
            out = self._run(model_fn, x_main, t, branches)
        finally:
            st.perturbed_rows = 0
            st.capture = False
            st.capture_rows = 0
        preds, variances = zip(
            *(split_learned_variance(c, channels) for c in out.chunk(len(branches))), strict=True
        )
        i_cond = 1 if self.do_cfg else 0
        res = StepOutputs(
            out_cond=preds[i_cond],
            out_uncond=preds[0] if self.do_cfg else None,
            variance=variances[i_cond],
            out_ptb=preds[-1] if do_pag else None,
            pag_scale=self.pag.scale_at(t) if do_pag else 0.0,
        )
        if do_sag:
            res.sag_ref = res.out_uncond if self.do_cfg else res.out_cond
            res.sag_scale = self.sag.scale
            alpha_bar = alpha_bar_at(
                self.scheduler, t, sigma_schedule=self._sigma_schedule, table=self._alpha_table(t)
            )
            mask = self._mask(x_in, res.sag_ref, alpha_bar, b)
            x_deg = sag_degraded_input(
                x_in,
                res.sag_ref,
                alpha_bar,
                self.prediction_type,
                mask,
                self.sag.blur_kernel_size,
                self.sag.blur_sigma,
            )
            out_sag = self._run(model_fn, x_deg, t, [branches[0]])
            res.out_sag, _ = split_learned_variance(out_sag, channels)
        return res

    def __call__(
        self,
        model_fn: ModelFn,
        sample: Tensor,
        t: Tensor,
        *,
        step: int = 0,
        num_steps: int = 1,
        model_input: Tensor | None = None,
    ) -> Tensor:
        """The guided model output for ``sample`` at timestep ``t`` (to hand to ``scheduler.step``).

        ``model_input`` is ``scheduler.scale_model_input(sample, t)`` when the caller already has it.
        With a learned variance, the variance channels of the conditional pass are kept.
        """
        x_in = model_input if model_input is not None else self.scheduler.scale_model_input(sample, t)
        r = self.passes(model_fn, x_in, t, step=step, num_steps=num_steps)
        guided = combine(
            r.out_cond,
            out_uncond=r.out_uncond,
            guidance_scale=self.guidance_scale if self.do_cfg else 1.0,
            sag_ref=r.sag_ref,
            out_sag=r.out_sag,
            sag_scale=r.sag_scale,
            out_ptb=r.out_ptb,
            pag_scale=r.pag_scale,
        )
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
    def _mask(self, x_in: Tensor, ref: Tensor, alpha_bar: Tensor, b: int) -> Tensor:
        """M of Eq. 14 for the first ``b`` rows (the SAG reference branch), shape (B, 1, H, W)."""
        size = tuple(x_in.shape[-2:])
        kind = self.sag.mask
        opts = {"device": x_in.device, "dtype": x_in.dtype}
        if kind == "attention":
            maps = []
            for name in self.sag_layers:
                if name not in self.state.maps:
                    raise RuntimeError(f"SAG layer {name!r} was not called during the model pass")
                agg, grid = self.state.maps[name]
                agg = agg[:b]
                maps.append((agg, grid if grid is not None else infer_grid(agg.shape[1], *size)))
            if len(maps) == 1:
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
            x0 = predict_x0(x_in, ref, alpha_bar, self.prediction_type)
            mask = highfreq_mask(x0, self.sag.mask_fraction)
        if self.record_masks:
            m = mask.detach().float()
            self.last_mask = m
            self.mask_sum = m if self.mask_sum is None else self.mask_sum + m
            self.mask_steps += 1
        return mask


def _graph_safe(model: nn.Module) -> bool:
    """False where replaying a captured graph would skip work the model does in Python at each call:
    forward hooks (user hooks, accelerate's offloading hooks that move weights)."""
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return False
    from torch.nn.modules import module as _module

    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks)


class CudaGraphPasses:
    """Replays the model passes of a sampling run from CUDA graphs.

    At batch sizes where the device waits on the host (Stable Diffusion at batch 1: a UNet call is about
    five thousand operator launches), launching is most of a step's time. Each distinct pass (branches,
    shapes, and the processors' state: map capture, perturbed rows) runs eagerly once, is captured into a
    CUDA graph the second time, and is replayed from then on. The model function's own tensors (prompt
    embeddings, labels) must stay the same while graphs live: a pipeline that changes them calls
    :meth:`reset`. The graphs and their memory are dropped when the run ends. A pass that cannot be
    captured falls back to eager for the rest of the run, with a warning.
    """

    def __init__(self, state: GuidanceState):
        self.state = state
        self.enabled = True
        self._graphs: dict[tuple, tuple] = {}
        self._seen: set[tuple] = set()

    def reset(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __call__(self, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str]) -> Tensor:
        if not (self.enabled and x.is_cuda):
            return model_fn(x, t, branches)
        if not isinstance(t, Tensor) or t.device != x.device:
            t = torch.as_tensor(t).to(x.device)
        st = self.state
        key = (tuple(branches), tuple(x.shape), x.dtype, tuple(t.shape), t.dtype)
        key += (st.capture, st.capture_rows, st.perturbed_rows)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first time: eager (also the warm-up the capture needs)
                self._seen.add(key)
                return model_fn(x, t, branches)
            entry = self._capture(key, model_fn, x, t, branches)
            if entry is None:
                return model_fn(x, t, branches)
        graph, static_x, static_t, static_out, maps = entry
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        if maps:
            st.maps.update({name: (agg.clone(), grid) for name, (agg, grid) in maps.items()})
        return static_out.clone()

    def _capture(self, key, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str]):
        import warnings

        static_x, static_t = x.clone(), t.clone()
        graph = torch.cuda.CUDAGraph()
        # The maps a capture records are the graph's output buffers (filled at each replay); the maps
        # recorded earlier in this step stay as they were.
        maps = self.state.maps
        earlier = dict(maps)
        maps.clear()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                static_out = model_fn(static_x, static_t, branches)
        except Exception as err:
            self.enabled = False
            self.reset()
            warnings.warn(
                f"attnguide: CUDA graph capture failed ({type(err).__name__}: {err}); "
                "running the model eagerly for the rest of this run",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        finally:
            recorded = dict(maps)
            maps.clear()
            maps.update(earlier)
        entry = (graph, static_x, static_t, static_out, recorded)
        self._graphs[key] = entry
        return entry


def sample_loop(
    guider: Guider,
    model_fn: ModelFn,
    latents: Tensor,
    *,
    extra_step_kwargs: dict | None = None,
    progress: Callable | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Denoise ``latents`` over ``guider.scheduler.timesteps`` (set them first) with guidance at every step.

    The loop of every non-SD pipeline and of bare denoiser + scheduler use: guided output, then
    ``scheduler.step``. ``progress`` wraps the timestep iterable (a tqdm-like callable);
    ``callback(i, t, latents)`` runs after each step.
    """
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
    return latents
