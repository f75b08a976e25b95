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
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..engine.guidance import check_scale
from ._guided import GuidedPipelineMixin, call_arguments
from .options import GuidanceOptions, PAGLayersMixin, divisible_size, positive_int, with_guidance_options


class _GuidedStableDiffusion(GuidedPipelineMixin, StableDiffusionPipeline):
    """diffusers' Stable Diffusion pipeline, guided; plus the checks and switches diffusers lacks."""

    def check_call(self, call: dict[str, Any]) -> None:
        """Every check that can fail, before any model runs: ValueError naming the argument."""
        check_scale("guidance_scale", call["guidance_scale"])
        check_scale("guidance_rescale", call.get("guidance_rescale", 0.0))
        f = self.vae_scale_factor
        default = self.unet.config.sample_size * f
        height = divisible_size("height", call["height"] or default, f, " (the VAE factor)")
        width = divisible_size("width", call["width"] or default, f, " (the VAE factor)")
        if call.get("timesteps") is None and call.get("sigmas") is None:
            positive_int("num_inference_steps", call["num_inference_steps"])
        positive_int("num_images_per_prompt", call["num_images_per_prompt"])
        embeds = call["prompt_embeds"]
        if embeds is not None and embeds.ndim != 3:
            raise ValueError(f"`prompt_embeds` must be (batch, tokens, dim), got shape {tuple(embeds.shape)}")
        self.check_inputs(
            call["prompt"],
            height,
            width,
            call.get("callback_steps"),
            call["negative_prompt"],
            embeds,
            call["negative_prompt_embeds"],
            call["ip_adapter_image"],
            call["ip_adapter_image_embeds"],
            call.get("callback_on_step_end_tensor_inputs"),
        )

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, *a, **kw):
        """diffusers' ``encode_prompt``, also with ``clip_skip`` on transformers 5.

        transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), which diffusers' clip-skip path
        still reads; the text encoder itself is exposed under that name for the duration of the call.
        """
        te = self.text_encoder
        shim = kw.get("clip_skip") is not None and te is not None and not hasattr(te, "text_model")
        if shim:
            te.__dict__["text_model"] = te
        try:
            return super().encode_prompt(
                prompt, device, num_images_per_prompt, do_classifier_free_guidance, *a, **kw
            )
        finally:
            if shim:
                del te.__dict__["text_model"]


class StableDiffusionSAGPipeline(_GuidedStableDiffusion):
    """Drop-in successor of diffusers' ``StableDiffusionSAGPipeline`` (same constructor, same arguments,
    same results), on any scheduler, with the SAG options exposed and PAG available beside it.

    ``sag_scale`` follows diffusers (s in out += s (u - degraded)); 0 disables SAG.
    """

    @torch.no_grad()
    @with_guidance_options(sag_scale=0.75)
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


class StableDiffusionPAGPipeline(PAGLayersMixin, _GuidedStableDiffusion):
    """Drop-in successor of diffusers' ``StableDiffusionPAGPipeline`` (same constructor with
    ``pag_applied_layers``, same arguments, same results), with SAG available beside PAG.

    Layer strings keep diffusers' meaning ("mid", "down", "up", "mid_block.attentions.0", "blocks.1", a
    regex, a full path), except that a number no longer matches a longer one ("blocks.1" is not
    "blocks.10"). A string that matches no self-attention layer raises ValueError before sampling.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
        pag_applied_layers: str | list[str] = "mid",
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder,
            requires_safety_checker,
        )
        self.set_pag_applied_layers(pag_applied_layers)

    @torch.no_grad()
    @with_guidance_options(sag_scale=0.0)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
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
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        pag_scale: float = 3.0,
        pag_adaptive_scale: float = 0.0,
        **kwargs: Any,
    ):
        """Generate images with CFG and PAG (and SAG where ``sag_scale`` > 0).

        The named arguments are diffusers' ``StableDiffusionPAGPipeline.__call__`` ones with the same
        defaults and meaning; the keyword-only :class:`GuidanceOptions` add SAG and step windows.
        """
        call = call_arguments(locals())
        self._pag_scale = call.pop("pag_scale")
        self._pag_adaptive_scale = call.pop("pag_adaptive_scale")
        call["callback_on_step_end_tensor_inputs"] = callback_on_step_end_tensor_inputs or ["latents"]
        options = GuidanceOptions.take(
            kwargs,
            sag_scale=0.0,
            pag_scale=self._pag_scale,
            pag_adaptive_scale=self._pag_adaptive_scale,
            pag_applied_layers=self.pag_applied_layers,
        )
        return self.run_guided(options, call, kwargs)


__all__ = ["StableDiffusionPAGPipeline", "StableDiffusionSAGPipeline"]
