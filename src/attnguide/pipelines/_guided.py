"""What every drop-in pipeline shares: its diffusers parent's ``__call__`` run inside :func:`guide`."""

from __future__ import annotations

import inspect
import threading
from inspect import Parameter
from typing import Any

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..engine.attention import DEFAULT_MAP_LIMITS, MapLimits, model_lock
from ..engine.step import Guider, ModelFn, sample_loop, scheduler_step_kwargs
from .guide import guide
from .options import GuidanceOptions, reject_unknown


def call_arguments(local_vars: dict[str, Any]) -> dict[str, Any]:
    """A ``__call__``'s own arguments from its ``locals()`` (without ``self`` and ``**kwargs``)."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "kwargs", "__class__")}


def bind_arguments(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``signature`` (a diffusers ``__call__``, with ``self``) would receive for
    ``(self, *args, **kwargs)``, defaults applied. Keywords it does not name stay in ``kwargs``."""
    params = signature.parameters
    named = {
        k: kwargs.pop(k) for k in list(kwargs) if k in params and params[k].kind is not Parameter.VAR_KEYWORD
    }
    bound = signature.bind_partial(None, *args, **named)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    for name, p in params.items():
        if p.kind is Parameter.VAR_KEYWORD:
            out.pop(name, None)
    return out


class GuidedPipelineMixin:
    """Mixed in before a diffusers pipeline class: :meth:`run_guided` validates the call, then runs the
    parent's own ``__call__`` (its loop, unchanged) inside :func:`attnguide.guide`."""

    #: Replay the denoiser passes from CUDA graphs on a CUDA device (attnguide.engine.cuda_graphs): the
    #: same results with far less launch overhead at small batch sizes. False runs every pass eagerly.
    cuda_graphs: bool = True
    #: When a SAG map is computed memory-flat (attnguide.engine.attention.MapLimits).
    map_limits: MapLimits = DEFAULT_MAP_LIMITS
    #: The engine of the last call (its layers, and the masks with ``record_masks=True``).
    last_guider: Guider | None = None

    def check_call(self, call: dict[str, Any]) -> None:
        """Checks of the call's arguments that must fail before any model runs (per pipeline)."""

    # diffusers 0.42 dropped these pipeline switches; the SAG pipeline documents them, so they stay here.
    def enable_vae_slicing(self) -> None:
        """Decode the batch one image at a time (less memory, same result)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        """Decode the batch in one step again."""
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping tiles (large images with little memory)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        """Decode in one step again."""
        self.vae.disable_tiling()

    def run_guided(self, options: GuidanceOptions, call: dict[str, Any], extra: dict[str, Any]):
        """Validate everything, then run the diffusers parent's ``__call__(**call, **extra)`` guided by
        ``options``. ``extra``: keyword arguments of the parent that this class does not name."""
        parent = super().__call__  # type: ignore[misc]
        allowed = set(inspect.signature(parent).parameters)
        reject_unknown(extra, allowed, f"{type(self).__name__}.__call__")
        call = {**call, **extra}
        if call.get("callback") is None:  # diffusers' legacy callback: only passed when given
            call.pop("callback", None)
            call.pop("callback_steps", None)
        sag, pag = options.sag(), options.pag()
        self.check_call(call)
        with guide(
            self,
            sag=sag,
            pag=pag,
            record_masks=options.record_masks,
            cuda_graphs=self.cuda_graphs,
            map_limits=self.map_limits,
            calling_thread_only=True,
        ) as guider:
            self.last_guider = guider
            return parent(**call)


OUTPUT_TYPES = ("pil", "np", "pt")


class OwnLoopMixin:
    """For the pipelines that diffusers has no loop for (class-conditional pixel UNets with CFG, DiT with
    any scheduler and null label): the engine's :func:`attnguide.sample_loop` and the output step."""

    last_guider: Guider | None = None

    def sample_guided(
        self,
        denoiser: nn.Module,
        model_fn: ModelFn,
        options: GuidanceOptions,
        *,
        guidance_scale: float | None,
        shape: tuple[int, ...],
        latents: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        eta: float,
        callback=None,
    ) -> torch.Tensor:
        """Denoise from ``latents`` (or fresh noise of ``shape``) with CFG weight ``guidance_scale``
        (None: no CFG) and the terms of ``options``; the Guider stays in ``self.last_guider``."""
        guider = Guider(
            denoiser,
            self.scheduler,
            guidance_scale=guidance_scale,
            sag=options.sag(),
            pag=options.pag(),
            record_masks=options.record_masks,
            owner=threading.get_ident(),
        )
        self.last_guider = guider
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=denoiser.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        with model_lock(denoiser):  # the scheduler's state is this run's until the loop ends
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return sample_loop(
                guider,
                model_fn,
                latents,
                extra_step_kwargs=scheduler_step_kwargs(self.scheduler, generator, eta),
                progress=self.progress_bar,
                callback=callback,
            )

    def image_output(self, images: torch.Tensor, output_type: str, return_dict: bool):
        """Images in [-1, 1] as diffusers returns them: [0, 1] tensors, numpy arrays or PIL images."""
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
