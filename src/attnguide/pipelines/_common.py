"""Argument gathering shared by the pipelines (the guidance math itself is in attnguide.guidance)."""

from collections.abc import Callable

import torch

from ..engine.guidance import PAG, SAG, check_scale


def positive_int(name: str, value) -> int:
    """``value`` if it is a positive int, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def divisible_size(name: str, value, factor: int, what: str = "") -> int:
    """``value`` if it is a positive int divisible by ``factor``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
        raise ValueError(f"`{name}` must be a positive integer divisible by {factor}{what}, got {value!r}")
    return value


class PAGLayersMixin:
    """diffusers' PAG pipeline interface: ``set_pag_applied_layers`` and the PAG properties."""

    pag_applied_layers: list[str]
    _pag_scale: float = 0.0
    _pag_adaptive_scale: float = 0.0

    def set_pag_applied_layers(self, pag_applied_layers: str | list[str]) -> None:
        """Choose the PAG layers (paths or patterns, matched by attnguide.attention.resolve_layers)."""
        layers = [pag_applied_layers] if isinstance(pag_applied_layers, str) else list(pag_applied_layers)
        for layer in layers:
            if not isinstance(layer, str):
                raise ValueError(f"`pag_applied_layers` must be a string or a list of strings, got {layer!r}")
        self.pag_applied_layers = layers

    @property
    def pag_scale(self) -> float:
        return self._pag_scale

    @property
    def pag_adaptive_scale(self) -> float:
        return self._pag_adaptive_scale

    @property
    def do_pag_adaptive_scaling(self) -> bool:
        return self._pag_adaptive_scale > 0 and self._pag_scale > 0 and len(self.pag_applied_layers) > 0

    @property
    def do_perturbed_attention_guidance(self) -> bool:
        return self._pag_scale > 0 and len(self.pag_applied_layers) > 0


def sag_from_args(
    scale: float,
    layers,
    threshold: float,
    kernel: int,
    sigma: float,
    mask: str,
    window: tuple[float, float],
    *,
    allow_negative: bool = False,
) -> SAG | None:
    """A :class:`SAG` term from pipeline arguments (None when the scale is 0), validated."""
    check_scale("sag_scale", scale, minimum=-float("inf") if allow_negative else 0.0)
    if scale == 0:
        return None
    return SAG(
        scale=scale,
        layers=layers,
        threshold=threshold,
        blur_kernel_size=kernel,
        blur_sigma=sigma,
        mask=mask,
        window=window,
    )


def pag_from_args(scale: float, adaptive: float, layers, window: tuple[float, float]) -> PAG | None:
    """A :class:`PAG` term from pipeline arguments (None when the scale is 0), validated."""
    check_scale("pag_scale", scale)
    check_scale("pag_adaptive_scale", adaptive)
    if scale == 0:
        return None
    return PAG(scale=scale, adaptive_scale=adaptive, layers=layers, window=window)


def denoise_loop(
    pipe,
    guider,
    model_fn: Callable,
    latents: torch.Tensor,
    timesteps,
    *,
    num_inference_steps: int,
    num_warmup_steps: int,
    extra_step_kwargs: dict,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable | None = None,
    callback_steps: int | None = 1,
) -> torch.Tensor:
    """The denoising loop of the text-to-image pipelines, in diffusers' order: the guided model output,
    ``scheduler.step``, ``on_step_end(i, t, latents) -> latents`` (the pipeline's handling of
    ``callback_on_step_end``), then the progress bar and the legacy ``callback``. ``pipe.interrupt``
    skips the remaining steps. The guider's processors are installed for the loop and always restored."""
    scheduler = pipe.scheduler
    pipe._num_timesteps = len(timesteps)
    with guider, pipe.progress_bar(total=num_inference_steps) as progress_bar:
        for i, t in enumerate(timesteps):
            if pipe._interrupt:
                continue
            noise_pred = guider(model_fn, latents, t, step=i, num_steps=len(timesteps))
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if on_step_end is not None:
                latents = on_step_end(i, t, latents)
            if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                progress_bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i // getattr(scheduler, "order", 1), t, latents)
    return latents
