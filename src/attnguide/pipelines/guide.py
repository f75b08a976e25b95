"""The one guided-pipeline mechanism: guidance for an existing diffusers pipeline (or a bare denoiser)
without copying its loop.

``with attnguide.guide(pipe, sag=SAG(scale=0.5)): images = pipe(...).images`` runs the pipeline's own
loop unchanged; while the block lasts, each call of the denoiser runs the guidance passes of
:meth:`attnguide.engine.step.Guider.passes` (SAG's degraded input, PAG's perturbed batch) and returns
outputs whose CFG combination is the guided prediction. attnguide's Stable Diffusion and SDXL pipelines
are diffusers' own pipelines run inside this block.

Why it is exact: the guidance terms add d = s_sag (ref - degraded) + s_pag (c - perturbed) to the
prediction. A pipeline that combines u + w (c - u) gets u + w (c - u) + d when it is handed c and
u - d / (w - 1) (w known: diffusers' text pipelines; then its CFG rescale still sees the unguided c, as
diffusers' PAG pipelines do), or c + d and u + d (w unknown, e.g. DiT); without CFG it gets c + d.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.attention import DEFAULT_MAP_LIMITS, MapLimits, model_lock
from ..engine.guidance import PAG, SAG, combine
from ..engine.step import Guider, StepOutputs

CFG_LAYOUTS = ("auto", "uncond_first", "cond_first", "none")


def _select_rows(obj: Any, parts: list[slice], total: int) -> Any:
    """The rows ``parts`` (stacked in that order) of every tensor in ``obj`` (nested dicts / lists /
    tuples) whose first dim is ``total``; other values as they are."""
    if isinstance(obj, Tensor):
        if obj.ndim == 0 or obj.shape[0] != total:
            return obj
        return obj[parts[0]] if len(parts) == 1 else torch.cat([obj[p] for p in parts])
    if isinstance(obj, dict):
        return {k: _select_rows(v, parts, total) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_select_rows(v, parts, total) for v in obj)
    return obj


def _inputs_key(obj: Any) -> tuple:
    """What a CUDA graph of a model call depends on besides x and t: the address, shape and dtype of
    every tensor argument and the value of every other one (a replay reads the tensors at those
    addresses, so a pipeline that hands in new tensors gets a new graph)."""
    if isinstance(obj, Tensor):
        return ("T", obj.data_ptr(), tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return tuple((k, _inputs_key(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return tuple(_inputs_key(v) for v in obj)
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return ("v", obj)


def resolve_cfg_layout(layout: str, pipe: Any, module: nn.Module, x: Tensor, kwargs: dict) -> str:
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


def branch_rows(layout: str, total: int) -> dict[str, slice]:
    """Where each CFG branch sits in a denoiser batch of ``total`` rows."""
    if layout == "none":
        return {"cond": slice(0, total)}
    if total % 2:
        raise ValueError(f"attnguide.guide: CFG layout {layout!r} needs an even batch, got {total}")
    b = total // 2
    first, second = slice(0, b), slice(b, total)
    return (
        {"uncond": first, "cond": second} if layout == "uncond_first" else {"cond": first, "uncond": second}
    )


def _cfg_weight(pipe: Any) -> float | None:
    """The pipeline's CFG weight w during a call, where it says (diffusers' ``guidance_scale``)."""
    try:
        w = getattr(pipe, "guidance_scale", None)
    except Exception:
        return None
    return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and w > 1 else None


class GuidedForward:
    """The ``forward`` that :func:`guide` puts on the denoiser for the ``with`` block: the guidance passes
    of one step, answered in the layout the pipeline asked for."""

    def __init__(self, module: nn.Module, original, guider: Guider, pipe: Any, layout: str):
        inner = getattr(module, "_orig_mod", module)  # a torch.compile wrapper's forward is (*args, **kw)
        params = list(inspect.signature(inner.forward).parameters)
        self.timestep_arg = "timestep" if "timestep" in params else params[1]
        self.module, self.original, self.guider = module, original, guider
        self.pipe, self.layout = pipe, layout
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
        rows = branch_rows(resolve_cfg_layout(self.layout, self.pipe, self.module, sample, kwargs), total)
        g = self.guider
        g.guidance_scale = 1.0 if "uncond" in rows else None  # marks the uncond branch; the pipeline does CFG
        t0 = torch.as_tensor(t)
        t0 = t0.reshape(-1)[0] if t0.ndim > 0 else t0  # the step's timestep, as the engine takes it
        per_row_t = isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == total
        r = g.passes(
            self._model_fn(kwargs, rows, total, per_row_t),
            sample[rows["cond"]],
            t0,
            step=self.step,
            num_steps=len(getattr(g.scheduler, "timesteps", [])) or 1,
            inputs_key=_inputs_key(kwargs),
        )
        self.step += 1
        return _wrap_output(self._assemble(r, rows, total), return_dict)

    def _model_fn(self, kwargs: dict, rows: dict[str, slice], total: int, per_row_t: bool):
        """``model_fn(x, t, branches)`` of the engine: the original forward with each branch's rows of
        the pipeline's arguments. It reads only its arguments and those tensors (CUDA-graph safe)."""

        def model_fn(x: Tensor, tt: Tensor, branches) -> Tensor:
            kw = _select_rows(kwargs, [rows[b] for b in branches], total)
            kw[self.timestep_arg] = tt.expand(x.shape[0]) if per_row_t else tt
            return self.original(x, return_dict=False, **kw)[0]

        return model_fn

    def _assemble(self, r: StepOutputs, rows: dict[str, slice], total: int) -> Tensor:
        """The outputs for the pipeline's batch: each branch shifted so that its CFG gives the guided
        prediction (see the module docstring); a learned variance is the conditional pass's."""
        guided = combine(
            r.out_cond,
            sag_ref=r.sag_ref,
            out_degraded=r.out_degraded,
            sag_scale=r.sag_scale,
            out_perturbed=r.out_perturbed,
            pag_scale=r.pag_scale,
        )
        parts = {"cond": guided}
        if "uncond" in rows:
            uncond_first = rows["uncond"].start == 0  # diffusers' text pipelines, whose w we can read
            w = _cfg_weight(self.pipe) if uncond_first else None
            delta = guided - r.out_cond
            if w is not None:
                parts = {"cond": r.out_cond, "uncond": r.out_uncond - delta / (w - 1)}
            else:
                parts["uncond"] = r.out_uncond + delta
        out = guided.new_empty((total, *guided.shape[1:]))
        for name, sl in rows.items():
            out[sl] = parts[name]
        if r.variance is not None:
            var = r.variance.new_empty((total, *r.variance.shape[1:]))
            for sl in rows.values():
                var[sl] = r.variance
            out = torch.cat([out, var], dim=1)
        return out


def _wrap_output(sample: Tensor, return_dict: bool):
    """What diffusers denoisers return: a tuple, or an output object with ``.sample``."""
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _denoiser_of(target: Any, scheduler: Any) -> tuple[Any, nn.Module, Any]:
    """(pipeline or None, the denoiser module, the scheduler) of a guide() target."""
    if isinstance(target, nn.Module):
        if scheduler is None:
            raise ValueError("`scheduler` is required when guiding a bare denoiser module")
        return None, target, scheduler
    module = getattr(target, "unet", None)
    if module is None:  # not ``or``: bool() of a torch.compile wrapper raises
        module = getattr(target, "transformer", None)
    if module is None:
        raise ValueError(
            f"`target`: {type(target).__name__} has neither a `unet` nor a `transformer` to guide"
        )
    return target, module, scheduler or target.scheduler


@contextlib.contextmanager
def guide(
    target: Any,
    *,
    sag: SAG | None = None,
    pag: PAG | None = None,
    scheduler: Any = None,
    cfg_layout: str = "auto",
    record_masks: bool = False,
    cuda_graphs: bool = False,
    map_limits: MapLimits = DEFAULT_MAP_LIMITS,
) -> Iterator[Guider]:
    """Add SAG / blur guidance / PAG to an existing pipeline (or a bare denoiser) for the ``with`` block.

    target: a diffusers pipeline with a ``unet`` or ``transformer``, or a denoiser module (then
    ``scheduler`` is required: the one whose ``scale_model_input`` / timesteps your loop uses).
    cfg_layout: how CFG branches sit in the denoiser's batch: "auto" (diffusers' text pipelines:
    [uncond, cond] when CFG is on; DiT: [cond, null label]), "uncond_first", "cond_first" or "none".
    record_masks, cuda_graphs, map_limits: as for :class:`attnguide.Guider`.
    The denoiser's ``forward`` and the attention processors are restored on exit, also on error.
    Yields the :class:`Guider` (its ``last_mask`` / ``mask_sum`` with ``record_masks``).
    """
    if cfg_layout not in CFG_LAYOUTS:
        raise ValueError(f"`cfg_layout` must be one of {CFG_LAYOUTS}, got {cfg_layout!r}")
    pipe, module, scheduler = _denoiser_of(target, scheduler)
    guider = Guider(
        module,
        scheduler,
        sag=sag,
        pag=pag,
        record_masks=record_masks,
        cuda_graphs=cuda_graphs,
        map_limits=map_limits,
    )
    # Without a term the pipeline's own call is the same computation; the forward still goes in where its
    # passes can be replayed from CUDA graphs (the speed-up applies to unguided and CFG-only runs too).
    first = next(module.parameters(), None)
    graphed = guider.graphs is not None and first is not None and first.is_cuda
    if guider.sag is None and guider.pag is None and not graphed:
        yield guider
        return
    # The forward and the processors are replaced for the whole block, under the model's lock: another
    # thread's guided call of the same pipeline (or model) waits for this one, scheduler state included.
    with model_lock(getattr(module, "_orig_mod", module)):
        original = module.forward
        had_instance_forward = "forward" in module.__dict__
        module.forward = GuidedForward(module, original, guider, pipe, cfg_layout)
        try:
            with guider:
                yield guider
        finally:
            if had_instance_forward:
                module.forward = original
            else:
                del module.forward
