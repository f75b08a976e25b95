"""What every drop-in pipeline shares: its diffusers parent's ``__call__`` run inside :func:`guide`."""

from __future__ import annotations

import inspect
import threading
from inspect import Parameter
from typing import Any

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from ..engine.attention import DEFAULT_MAP_LIMITS, MapLimits, model_lock
from ..engine.checks import (
    all_true,
    check_eta,
    check_finite_output,
    check_generators,
    check_latents,
    check_scale,
    check_steps,
    finite_flag,
    non_finite_output_error,
)
from ..engine.step import Guider, ModelFn, sample_loop, scheduler_step_kwargs
from ..engine.terms import ClassifierGuidance
from .call_checks import check_call_arguments, check_output_type
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
    #: The call argument that holds the CFG weight (Flux: ``true_cfg_scale``; its ``guidance_scale`` is
    #: the distilled guidance embedding).
    cfg_weight_argument: str = "guidance_scale"

    def check_call(self, call: dict[str, Any]) -> None:
        """Checks of the call's arguments that must fail before any model runs: the ones diffusers'
        pipelines share (:func:`check_call_arguments`); pipelines add their own."""
        check_call_arguments(self, call, self.latents_shape(call))

    def latents_shape(self, call: dict[str, Any]) -> tuple[int, ...] | None:
        """The shape the call's ``latents`` must have, where the pipeline knows it (else None)."""
        return None

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
        terms = options.check()
        self.check_call(call)
        weight = self.cfg_weight_argument
        cfg = (call.get(weight) or 0.0) > 1.0
        scales = {
            weight: call[weight] if cfg else None,
            **options.scales(),
            "guidance_rescale": call.get("guidance_rescale") if cfg else None,
        }
        watch = DecodedOutputCheck(getattr(self, "vae", None))
        with (
            guide(
                self,
                **terms,
                record_masks=options.record_masks,
                cuda_graphs=self.cuda_graphs,
                map_limits=self.map_limits,
                calling_thread_only=True,
            ) as guider,
            watch,
        ):
            self.last_guider = guider
            out = parent(**call)
        watch.check(out, scales)
        return out


class DecodedOutputCheck:
    """Checks that a pipeline call's output is finite, once, at the end: the images its VAE decoder
    made in this thread (a forward hook for the call, whatever the output type) or, where nothing was
    decoded (``output_type="latent"``), the returned latents. A non-finite output raises the ValueError of
    :func:`attnguide.engine.checks.non_finite_output_error`, naming the scale that likely caused it."""

    def __init__(self, vae: Any):
        decoder = getattr(vae, "decoder", None)
        self.decoder = decoder if isinstance(decoder, nn.Module) else None
        self.owner = threading.get_ident()
        self.flags: list[Tensor] = []
        self._handle = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self.owner and isinstance(output, Tensor):
            self.flags.append(finite_flag(output))

    def __enter__(self) -> DecodedOutputCheck:
        if self.decoder is not None:
            self._handle = self.decoder.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def check(self, out: Any, scales: dict[str, float | None]) -> None:
        """ValueError where the watched output (or ``out``'s first entry, a tensor) is not finite."""
        flags = list(self.flags)
        if not flags:
            try:
                first = out[0]
            except (TypeError, IndexError, KeyError):
                first = None
            if isinstance(first, Tensor) and first.is_floating_point():
                flags.append(finite_flag(first))
        if not all_true(flags):
            raise non_finite_output_error(scales)


#: The output types of the pipelines with their own loop (pixel images; no "latent").
IMAGE_OUTPUT_TYPES = ("pil", "np", "pt")


class OwnLoopMixin:
    """For the pipelines that diffusers has no loop for (class-conditional pixel UNets with CFG, DiT with
    any scheduler and null label): the engine's :func:`attnguide.sample_loop` and the output step."""

    last_guider: Guider | None = None

    def check_loop_arguments(
        self,
        denoiser: nn.Module,
        *,
        shape: tuple[int, ...],
        latents: Any,
        generator: Any,
        num_inference_steps: Any,
        eta: Any,
        guidance_scale: Any,
        output_type: Any,
        callback: Any = None,
    ) -> None:
        """The checks that these pipelines share, before any model runs: ValueError / TypeError naming
        the argument. ``shape``: the noise shape this call asks for (``latents`` must have it)."""
        if callback is not None and not callable(callback):
            raise TypeError(f"`callback` must be callable or None, got {callback!r}")
        check_steps(self.scheduler, num_inference_steps)
        check_eta(eta)
        check_scale("guidance_scale", guidance_scale)
        check_output_type(output_type, IMAGE_OUTPUT_TYPES)
        check_generators(generator, shape[0])
        check_latents("latents", latents, shape=shape, dtype=denoiser.dtype)

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
        classifier: ClassifierGuidance | None = None,
    ) -> torch.Tensor:
        """Denoise from ``latents`` (or fresh noise of ``shape``) with CFG weight ``guidance_scale``
        (None: no CFG), the terms of ``options`` and ``classifier`` guidance (or None); the Guider stays
        in ``self.last_guider``. The result is checked for finiteness by :meth:`image_output`."""
        guider = Guider(
            denoiser,
            self.scheduler,
            guidance_scale=guidance_scale,
            **options.check(),
            classifier=classifier,
            record_masks=options.record_masks,
            owner=threading.get_ident(),
        )
        self.last_guider = guider
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=denoiser.dtype)
        else:
            check_latents("latents", latents, shape=shape, dtype=denoiser.dtype, finite=False)
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
                check_output=False,
            )

    def image_output(self, images: torch.Tensor, output_type: str, return_dict: bool):
        """Images in [-1, 1] as diffusers returns them: [0, 1] tensors, numpy arrays or PIL images.
        ValueError naming the likely scale where they are not finite (one host sync)."""
        check_finite_output(images, self.last_guider.scales() if self.last_guider is not None else {})
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
