"""Drop-in Stable Diffusion 1.x/2.x pipelines with SAG, blur guidance and PAG.

Each class is diffusers' own ``StableDiffusionPipeline`` whose loop runs inside :func:`attnguide.guide`
(the one guided-pipeline mechanism), with the ``__call__`` arguments of the diffusers pipeline it
replaces: :class:`StableDiffusionSAGPipeline` those of diffusers' deprecated SAG pipeline (same results
for the schedulers that pipeline accepts), :class:`StableDiffusionPAGPipeline` those of diffusers' PAG
pipeline (same results). Both take every guidance option (:class:`GuidanceOptions`): SAG + PAG + CFG in one
call, any scheduler (Euler, Heun, LMS, Karras sigmas included), and ``cross_attention_kwargs`` reach
every pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPAGPipeline as _DiffusersPAG
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import PipelineImageInput

from ._guided import GuidedPipelineMixin, call_arguments
from .call_checks import image_size, latent_shape
from .options import GuidanceOptions, with_guidance_options
from .pag_compat import pag_dropin
from .scheduler_fixups import init_with_scheduler_fixups


class ClipSkipMixin:
    """``clip_skip`` on transformers 5 for the pipelines with diffusers' Stable Diffusion 1.x
    ``encode_prompt`` (text-to-image, img2img, inpainting, ControlNet, AnimateDiff); mixed in before them.
    Also the check that ``encode_prompt`` makes only after encoding the prompt."""

    def check_call(self, call: dict[str, Any]) -> None:
        """The shared checks, and: ``negative_prompt`` of the type of ``prompt`` (this ``encode_prompt``
        raises TypeError otherwise, after the text encoder ran)."""
        super().check_call(call)  # type: ignore[misc]
        prompt, negative = call.get("prompt"), call.get("negative_prompt")
        cfg = call.get("guidance_scale", 0.0) > 1.0
        if cfg and prompt is not None and negative is not None and type(prompt) is not type(negative):
            raise TypeError(
                f"`negative_prompt` must be of the type of `prompt` ({type(prompt).__name__}), got "
                f"{type(negative).__name__}"
            )

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """diffusers' ``encode_prompt`` (its signature), also with ``clip_skip`` on transformers 5.

        transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), which diffusers' clip-skip path
        still reads; the text encoder itself is exposed under that name for the duration of the call.
        """
        te = self.text_encoder
        shim = clip_skip is not None and te is not None and not hasattr(te, "text_model")
        if shim:
            te.__dict__["text_model"] = te
        try:
            return super().encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                lora_scale,
                clip_skip,
            )
        finally:
            if shim:
                del te.__dict__["text_model"]


class _GuidedStableDiffusion(ClipSkipMixin, GuidedPipelineMixin, StableDiffusionPipeline):
    """diffusers' Stable Diffusion pipeline, guided; plus the checks and switches diffusers lacks."""

    def checked_size(self, call: dict[str, Any]) -> tuple[int, int]:
        """The call's (height, width), checked (None: the UNet's default size)."""
        f = self.vae_scale_factor
        return image_size(call, self.unet.config.sample_size * f, f, " (the VAE factor)")

    def latents_shape(self, call: dict[str, Any]) -> tuple[int, ...] | None:
        f = self.vae_scale_factor
        height, width = self.checked_size(call)
        return latent_shape(call, self.unet.config.in_channels, height // f, width // f)

    def check_call(self, call: dict[str, Any]) -> None:
        """Every check that can fail, before any model runs: ValueError naming the argument."""
        super().check_call(call)
        height, width = self.checked_size(call)
        self.check_inputs(
            call["prompt"],
            height,
            width,
            call.get("callback_steps"),
            call["negative_prompt"],
            call["prompt_embeds"],
            call["negative_prompt_embeds"],
            call["ip_adapter_image"],
            call["ip_adapter_image_embeds"],
            call.get("callback_on_step_end_tensor_inputs"),
        )


class StableDiffusionSAGPipeline(_GuidedStableDiffusion):
    """Drop-in successor of diffusers' ``StableDiffusionSAGPipeline`` (same constructor, same arguments,
    same results), on any scheduler, with the SAG options exposed and PAG available beside it.

    ``sag_scale`` follows diffusers (s in out += s (u - degraded)); 0 disables SAG.
    """

    # diffusers' SAG pipeline corrects no scheduler config (StableDiffusionPipeline corrects two)
    __init__ = init_with_scheduler_fixups(StableDiffusionPipeline.__init__, ())

    @torch.no_grad()
    @with_guidance_options()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sag_scale: float = 0.75,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int | None = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        **kwargs: Any,
    ):
        """Generate images with CFG (``guidance_scale`` > 1), SAG (``sag_scale`` > 0) and, optionally, PAG.

        The named arguments are diffusers' ``StableDiffusionSAGPipeline.__call__`` ones with the same
        defaults and meaning. Keyword-only beyond them: every :class:`GuidanceOptions` field
        (``sag_layers``, ``sag_threshold`` (psi), ``sag_blur_kernel_size`` / ``sag_blur_sigma``,
        ``sag_mask`` ("attention" = SAG, "global" = blur guidance, or an ablation mask), step windows,
        PAG (``pag_scale`` > 0), ``record_masks``) and ``StableDiffusionPipeline``'s other arguments
        (``timesteps``, ``sigmas``, ``guidance_rescale``, ``callback_on_step_end``, ...).
        """
        call = call_arguments(locals())
        options = GuidanceOptions.take(kwargs, sag_scale=call.pop("sag_scale"))
        return self.run_guided(options, call, kwargs)


class StableDiffusionPAGPipeline(
    pag_dropin(_GuidedStableDiffusion, _DiffusersPAG, init=StableDiffusionPipeline.__init__, like=False)
):
    """Drop-in successor of diffusers' ``StableDiffusionPAGPipeline`` (same constructor with
    ``pag_applied_layers``, same arguments, same results), with SAG available beside PAG.

    Layer strings keep diffusers' meaning ("mid", "down", "up", "mid_block.attentions.0", "blocks.1", a
    regex, a full path), except that a number no longer matches a longer one ("blocks.1" is not
    "blocks.10"). A string that matches no self-attention layer raises ValueError before sampling.
    """


__all__ = ["ClipSkipMixin", "StableDiffusionPAGPipeline", "StableDiffusionSAGPipeline"]
