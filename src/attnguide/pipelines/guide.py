"""Guidance for an existing diffusers pipeline object (or a bare denoiser) without a new pipeline class.

``with attnguide.guide(pipe, sag=SAG(scale=0.5)): images = pipe(...).images`` runs the pipeline's own
loop unchanged; while the block lasts, each call of the denoiser also runs the guidance passes (SAG's
degraded input, PAG's perturbed batch) and adds the guidance terms to every CFG branch of its output.
The pipeline's own CFG combination u' + w (c' - u') of outputs shifted by the same d then gives
u + w (c - u) + d: exactly what :class:`attnguide.Guider` computes, for any pipeline whose loop combines
the denoiser outputs linearly (SD, SDXL, DiT, DDPM, ...).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.guidance import PAG, SAG, combine
from ..engine.step import Guider

CFG_LAYOUTS = ("auto", "uncond_first", "cond_first", "none")


def _take(obj: Any, rows: Tensor, total: int) -> Any:
    """Select batch rows of every tensor (in nested dicts / lists / tuples) whose first dim is ``total``."""
    if isinstance(obj, Tensor):
        return obj[rows] if obj.ndim > 0 and obj.shape[0] == total else obj
    if isinstance(obj, dict):
        return {k: _take(v, rows, total) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, rows, total) for v in obj)
    return obj


def _cfg_layout(layout: str, pipe: Any, module: nn.Module, x: Tensor, kwargs: dict) -> str:
    """Resolve "auto": diffusers' text pipelines put [uncond, cond] when do_classifier_free_guidance;
    DiT puts [cond, null-label] (recognised by the null label in the second half)."""
    if layout != "auto":
        return layout
    flag = getattr(pipe, "do_classifier_free_guidance", None) if pipe is not None else None
    if flag is not None:
        try:
            return "uncond_first" if bool(flag) else "none"
        except Exception:  # property read outside a call
            pass
    labels = kwargs.get("class_labels")
    null = getattr(getattr(module, "config", None), "num_embeds_ada_norm", None)
    if isinstance(labels, Tensor) and null is not None and labels.shape[0] % 2 == 0 and x.shape[0] % 2 == 0:
        half = labels.shape[0] // 2
        if bool((labels[half:] == null).all()) and not bool((labels[:half] == null).all()):
            return "cond_first"
    return "none"


def _timestep_value(t: Any) -> Tensor:
    t = torch.as_tensor(t)
    return t.reshape(-1)[0] if t.ndim > 0 else t


class _GuidedForward:
    """The replacement ``forward`` of the wrapped denoiser (see :func:`guide`)."""

    def __init__(
        self, module: nn.Module, original, guider: Guider, pipe: Any, layout: str, timestep_arg: str
    ):
        self.module = module
        self.original = original
        self.guider = guider
        self.pipe = pipe
        self.layout = layout
        self.timestep_arg = timestep_arg
        self.step = 0

    def __call__(self, sample: Tensor, *args, **kwargs):
        if args:  # diffusers denoisers take (sample, timestep, ...); keep the timestep as a keyword
            kwargs[self.timestep_arg] = args[0]
            args = args[1:]
        if args:
            raise TypeError("attnguide.guide: pass the denoiser's arguments after the timestep by keyword")
        t = kwargs.pop(self.timestep_arg)
        return_dict = kwargs.pop("return_dict", True)
        total = sample.shape[0]
        layout = _cfg_layout(self.layout, self.pipe, self.module, sample, kwargs)
        halves = layout in ("uncond_first", "cond_first")
        if halves and total % 2:
            raise ValueError(f"attnguide.guide: CFG layout {layout!r} needs an even batch, got {total}")
        b = total // 2 if halves else total
        idx = {
            "uncond": torch.arange(0, b) if layout == "uncond_first" else torch.arange(b, 2 * b),
            "cond": torch.arange(b, 2 * b) if layout == "uncond_first" else torch.arange(0, b),
        }
        if not halves:
            idx = {"cond": torch.arange(0, total)}
        idx = {k: v.to(sample.device) for k, v in idx.items()}

        def model_fn(x: Tensor, tt: Tensor, branches) -> Tensor:
            rows = torch.cat([idx[br] for br in branches])
            kw = _take(kwargs, rows, total)
            kw[self.timestep_arg] = _take(t, rows, total)
            return self.original(x, return_dict=False, **kw)[0]

        g = self.guider
        g.guidance_scale = 1.0 if halves else None  # only marks the uncond branch; the pipeline does CFG
        x_cond = sample[idx["cond"]]
        num_steps = len(getattr(g.scheduler, "timesteps", [])) or 1
        r = g.passes(model_fn, x_cond, _timestep_value(t), step=self.step, num_steps=num_steps)
        self.step += 1
        guided_cond = combine(
            r.out_cond,
            sag_ref=r.sag_ref,
            out_sag=r.out_sag,
            sag_scale=r.sag_scale,
            out_ptb=r.out_ptb,
            pag_scale=r.pag_scale,
        )
        delta = guided_cond - r.out_cond
        parts = {"cond": r.out_cond + delta}
        if halves:
            parts["uncond"] = r.out_uncond + delta
        out = torch.empty((total, *r.out_cond.shape[1:]), dtype=r.out_cond.dtype, device=r.out_cond.device)
        for name, rows in idx.items():
            out[rows] = parts[name]
        if r.variance is not None:
            # learned variance: every branch gets the conditional pass's (the unguided prediction's)
            var = torch.empty(
                (total, *r.variance.shape[1:]), dtype=r.variance.dtype, device=r.variance.device
            )
            for rows in idx.values():
                var[rows] = r.variance
            out = torch.cat([out, var], dim=1)
        return _wrap_output(out, return_dict)


def _wrap_output(sample: Tensor, return_dict: bool):
    """What diffusers denoisers return: a tuple, or an output object with ``.sample``."""
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


@contextlib.contextmanager
def guide(
    target: Any,
    *,
    sag: SAG | None = None,
    pag: PAG | None = None,
    scheduler: Any = None,
    cfg_layout: str = "auto",
) -> Iterator[Guider]:
    """Add SAG / blur guidance / PAG to an existing pipeline (or a bare denoiser) for the ``with`` block.

    target: a diffusers pipeline with a ``unet`` or ``transformer``, or a denoiser module (then
    ``scheduler`` is required: the one whose ``scale_model_input`` / timesteps your loop uses).
    cfg_layout: how CFG branches sit in the denoiser's batch: "auto" (diffusers' text pipelines:
    [uncond, cond] when CFG is on; DiT: [cond, null label]), "uncond_first", "cond_first" or "none".
    The denoiser's ``forward`` and the attention processors are restored on exit, also on error.
    Yields the :class:`Guider` (its ``last_mask`` / ``mask_sum`` when ``record_masks`` is set on it).
    """
    if cfg_layout not in CFG_LAYOUTS:
        raise ValueError(f"`cfg_layout` must be one of {CFG_LAYOUTS}, got {cfg_layout!r}")
    pipe = None
    if isinstance(target, nn.Module):
        module = target
        if scheduler is None:
            raise ValueError("`scheduler` is required when guiding a bare denoiser module")
    else:
        pipe = target
        module = getattr(target, "unet", None) or getattr(target, "transformer", None)
        if module is None:
            raise ValueError(
                f"`target`: {type(target).__name__} has neither a `unet` nor a `transformer` to guide"
            )
        scheduler = scheduler or target.scheduler
    guider = Guider(module, scheduler, sag=sag, pag=pag)
    if guider.sag is None and guider.pag is None:
        yield guider
        return
    params = list(inspect.signature(module.forward).parameters)
    timestep_arg = "timestep" if "timestep" in params else params[1]
    original = module.forward
    had_instance_forward = "forward" in module.__dict__
    module.forward = _GuidedForward(module, original, guider, pipe, cfg_layout, timestep_arg)
    try:
        with guider:
            yield guider
    finally:
        if had_instance_forward:
            module.forward = original
        else:
            del module.forward
