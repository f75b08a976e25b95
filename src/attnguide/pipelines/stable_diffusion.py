"""Drop-in Stable Diffusion 1.x/2.x pipelines with SAG, blur guidance and PAG.

:class:`StableDiffusionSAGPipeline` takes the constructor and ``__call__`` arguments of diffusers'
(deprecated) pipeline of the same name and gives the same numbers for the schedulers that pipeline
accepts; :class:`StableDiffusionPAGPipeline` does the same for diffusers' PAG pipeline. Both run on the
one engine (:class:`attnguide.sampling.Guider`), so both accept every term: SAG + PAG + CFG in one call,
any scheduler (Euler, Heun, LMS, Karras sigmas included), and ``cross_attention_kwargs`` reach every pass.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..engine.attention import DEFAULT_MAP_LIMITS, MapLimits
from ..engine.guidance import PAG, SAG, check_scale
from ..engine.step import Guider
from ._common import PAGLayersMixin, denoise_loop, divisible_size, pag_from_args, positive_int, sag_from_args

_SD = StableDiffusionPipeline


class _GuidedStableDiffusion(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    """Shared body of the SD pipelines: input gathering in diffusers' conventions, guidance by the engine."""

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    #: Replay the UNet passes from CUDA graphs on a CUDA device (attnguide.sampling.CudaGraphPasses): the
    #: same results with far less launch overhead at small batch sizes. False runs every pass eagerly.
    cuda_graphs: bool = True
    #: When a SAG map is computed memory-flat (attnguide.engine.attention.MapLimits).
    map_limits: MapLimits = DEFAULT_MAP_LIMITS

    # Input handling is diffusers' own (maintained StableDiffusionPipeline code), not a copy.
    encode_image = _SD.encode_image
    prepare_ip_adapter_image_embeds = _SD.prepare_ip_adapter_image_embeds
    run_safety_checker = _SD.run_safety_checker
    prepare_extra_step_kwargs = _SD.prepare_extra_step_kwargs
    prepare_latents = _SD.prepare_latents
    get_guidance_scale_embedding = _SD.get_guidance_scale_embedding
    _check_diffusers_inputs = _SD.check_inputs

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
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.last_guider: Guider | None = None  # the engine of the last call (masks, layers)

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
        """diffusers' ``StableDiffusionPipeline.encode_prompt``, also with ``clip_skip`` on transformers 5.

        transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), which diffusers' clip-skip path
        still reads; the text encoder itself is exposed under that name for the duration of the call.
        """
        te = self.text_encoder
        shim = clip_skip is not None and te is not None and not hasattr(te, "text_model")
        if shim:
            te.__dict__["text_model"] = te
        try:
            return _SD.encode_prompt(
                self,
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        finally:
            if shim:
                del te.__dict__["text_model"]

    # ------------------------------------------------------------------ validation
    def _validate(
        self,
        *,
        prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        timesteps,
        sigmas,
        guidance_scale: float,
        sag_scale: float,
        pag_scale: float,
        pag_adaptive_scale: float,
        guidance_rescale: float,
        num_images_per_prompt: int,
        callback_steps,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Every check that can fail, before any model runs: ValueError naming the argument."""
        check_scale("guidance_scale", guidance_scale)
        check_scale("sag_scale", sag_scale)
        check_scale("pag_scale", pag_scale)
        check_scale("pag_adaptive_scale", pag_adaptive_scale)
        check_scale("guidance_rescale", guidance_rescale)
        f = self.vae_scale_factor
        divisible_size("height", height, f, " (the VAE factor)")
        divisible_size("width", width, f, " (the VAE factor)")
        if timesteps is None and sigmas is None:
            positive_int("num_inference_steps", num_inference_steps)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}"
            )
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise ValueError(
                f"`prompt_embeds` must be (batch, tokens, dim), got shape {tuple(prompt_embeds.shape)}"
            )
        self._check_diffusers_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        *,
        prompt,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        guidance_scale,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
        output_type,
        return_dict,
        cross_attention_kwargs,
        guidance_rescale,
        clip_skip,
        callback,
        callback_steps,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        sag: SAG | None,
        pag: PAG | None,
        record_masks: bool = False,
    ):
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self._validate(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            sag_scale=sag.scale if sag is not None else 0.0,
            pag_scale=pag.scale if pag is not None else 0.0,
            pag_adaptive_scale=pag.adaptive_scale if pag is not None else 0.0,
            guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt,
            callback_steps=callback_steps,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        do_cfg = guidance_scale > 1.0
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        guider = Guider(
            self.unet,
            self.scheduler,
            guidance_scale=guidance_scale if do_cfg else None,
            sag=sag,
            pag=pag,
            guidance_rescale=guidance_rescale,
            record_masks=record_masks,
            cuda_graphs=self.cuda_graphs,
            map_limits=self.map_limits,
        )
        self.last_guider = guider

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        image_embeds: dict[str, list[torch.Tensor]] | None = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt, do_cfg
            )
            image_embeds = {"cond": [], "uncond": []}
            for e in embeds:
                neg, pos = e.chunk(2) if do_cfg else (None, e)
                image_embeds["cond"].append(pos.to(device))
                image_embeds["uncond"].append(neg.to(device) if neg is not None else None)

        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                w, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        text = {"cond": prompt_embeds, "uncond": negative_prompt_embeds}
        cache: dict[tuple[str, ...], dict[str, Any]] = {}

        def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            key = tuple(branches)
            if key not in cache:
                kw: dict[str, Any] = {"encoder_hidden_states": torch.cat([text[b] for b in key])}
                if image_embeds is not None:
                    kw["added_cond_kwargs"] = {
                        "image_embeds": [
                            torch.cat([image_embeds[b][i] for b in key])
                            for i in range(len(image_embeds["cond"]))
                        ]
                    }
                if timestep_cond is not None:
                    kw["timestep_cond"] = torch.cat([timestep_cond] * len(key))
                cache[key] = kw
            return self.unet(
                x, t, cross_attention_kwargs=cross_attention_kwargs, return_dict=False, **cache[key]
            )[0]

        def on_step_end(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            nonlocal prompt_embeds, negative_prompt_embeds
            local = {
                "latents": latents,
                "prompt_embeds": prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds,
            }
            outputs = callback_on_step_end(
                self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
            )
            latents = outputs.pop("latents", latents)
            new_pe = outputs.pop("prompt_embeds", prompt_embeds)
            new_ne = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
            if new_pe is not prompt_embeds or new_ne is not negative_prompt_embeds:
                prompt_embeds, negative_prompt_embeds = new_pe, new_ne
                text.update(cond=prompt_embeds, uncond=negative_prompt_embeds)
                cache.clear()
                if guider.graphs is not None:
                    guider.graphs.reset()
            return latents

        latents = denoise_loop(
            self,
            guider,
            model_fn,
            latents,
            timesteps,
            num_inference_steps=num_inference_steps,
            num_warmup_steps=len(timesteps) - num_inference_steps * self.scheduler.order,
            extra_step_kwargs=extra_step_kwargs,
            on_step_end=on_step_end if callback_on_step_end is not None else None,
            callback=callback,
            callback_steps=callback_steps,
        )

        if output_type != "latent":
            image = self.vae.decode(
                latents / self.vae.config.scaling_factor, return_dict=False, generator=generator
            )[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None
        do_denormalize = (
            [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        )
        image = self.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=do_denormalize
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

    # diffusers' pipeline properties, for callbacks that read them
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt


class StableDiffusionSAGPipeline(_GuidedStableDiffusion):
    """Drop-in successor of diffusers' ``StableDiffusionSAGPipeline`` (same constructor, same arguments,
    same results), on any scheduler, with the SAG options exposed and PAG available beside it.

    ``sag_scale`` follows diffusers (s in out += s (u - degraded)); 0 disables SAG.
    """

    @torch.no_grad()
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
        *,
        sag_layers: str | list[str] | None = None,
        sag_threshold: float = 1.0,
        sag_blur_kernel_size: int = 9,
        sag_blur_sigma: float = 1.0,
        sag_mask: str = "attention",
        sag_window: tuple[float, float] = (0.0, 1.0),
        pag_scale: float = 0.0,
        pag_adaptive_scale: float = 0.0,
        pag_applied_layers: str | list[str] = "mid",
        pag_window: tuple[float, float] = (0.0, 1.0),
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        record_masks: bool = False,
    ):
        """Generate images with CFG (``guidance_scale`` > 1), SAG (``sag_scale`` > 0) and, optionally, PAG.

        The arguments up to ``clip_skip`` are diffusers' ``StableDiffusionSAGPipeline.__call__`` ones with
        the same defaults and meaning. Beyond them: ``sag_layers`` (default: the mid block's first
        self-attention), ``sag_threshold`` (psi), ``sag_blur_kernel_size`` / ``sag_blur_sigma``,
        ``sag_mask`` ("attention" = SAG, "global" = blur guidance, or an ablation mask), step windows, PAG
        (``pag_scale`` > 0), CFG rescale, custom ``timesteps`` / ``sigmas``, ``callback_on_step_end``, and
        ``record_masks`` (the summed SAG masks land in ``self.last_guider.mask_sum``).
        """
        return self._generate(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            clip_skip=clip_skip,
            callback=callback,
            callback_steps=callback_steps,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            sag=sag_from_args(
                sag_scale,
                sag_layers,
                sag_threshold,
                sag_blur_kernel_size,
                sag_blur_sigma,
                sag_mask,
                sag_window,
            ),
            pag=pag_from_args(pag_scale, pag_adaptive_scale, pag_applied_layers, pag_window),
            record_masks=record_masks,
        )


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
        *,
        pag_window: tuple[float, float] = (0.0, 1.0),
        sag_scale: float = 0.0,
        sag_layers: str | list[str] | None = None,
        sag_threshold: float = 1.0,
        sag_blur_kernel_size: int = 9,
        sag_blur_sigma: float = 1.0,
        sag_mask: str = "attention",
        sag_window: tuple[float, float] = (0.0, 1.0),
        record_masks: bool = False,
    ):
        """Generate images with CFG and PAG (and SAG where ``sag_scale`` > 0).

        The arguments up to ``pag_adaptive_scale`` are diffusers' ``StableDiffusionPAGPipeline.__call__``
        ones with the same defaults and meaning; the keyword-only ones add SAG and step windows.
        """
        self._pag_scale = pag_scale
        self._pag_adaptive_scale = pag_adaptive_scale
        pag = pag_from_args(pag_scale, pag_adaptive_scale, self.pag_applied_layers, pag_window)
        return self._generate(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            clip_skip=clip_skip,
            callback=None,
            callback_steps=None,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            sag=sag_from_args(
                sag_scale,
                sag_layers,
                sag_threshold,
                sag_blur_kernel_size,
                sag_blur_sigma,
                sag_mask,
                sag_window,
            ),
            pag=pag if len(self.pag_applied_layers) > 0 else None,
            record_masks=record_masks,
        )


__all__ = ["StableDiffusionPAGPipeline", "StableDiffusionSAGPipeline"]
