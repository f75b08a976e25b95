"""Drop-in Stable Diffusion XL pipelines with SAG, blur guidance and PAG.

:class:`StableDiffusionXLSAGPipeline` takes the constructor and ``__call__`` arguments of diffusers'
``StableDiffusionXLPipeline`` (with ``sag_scale=0`` it gives the same numbers) and adds SAG, blur guidance
and PAG; :class:`StableDiffusionXLPAGPipeline` takes those of diffusers' ``StableDiffusionXLPAGPipeline``
and gives the same numbers, with SAG available beside PAG. Both run on the one engine
(:class:`attnguide.sampling.Guider`): any scheduler, every term in one call, and the SDXL micro-conditioning
(pooled text embeddings and ``time_ids``) reaches every pass, the degraded SAG pass included. diffusers has
no SAG pipeline for SDXL (its SD 1.x one cannot run an SDXL UNet, which needs ``added_cond_kwargs``).
"""

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import is_invisible_watermark_available
from diffusers.utils.torch_utils import get_module_execution_device
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..engine.attention import DEFAULT_MAP_LIMITS, MapLimits
from ..engine.guidance import PAG, SAG, check_scale
from ..engine.step import Guider
from ._common import PAGLayersMixin, denoise_loop, divisible_size, pag_from_args, positive_int, sag_from_args
from .stable_diffusion import _GuidedStableDiffusion

_XL = StableDiffusionXLPipeline


def _as_pair(name: str, value) -> tuple[int, int]:
    """An SDXL size or crop argument as a tuple of two numbers, else ValueError naming it."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
    ):
        raise ValueError(f"`{name}` must be a pair of numbers (height, width) or (top, left), got {value!r}")
    return tuple(value)


def _batch_of(name: str, value, batch_size: int) -> None:
    if isinstance(value, list) and len(value) != batch_size:
        raise ValueError(
            f"`{name}` has {len(value)} entries but the prompt batch has {batch_size}; they must match"
        )


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``t`` with ``n`` rows: a single row is repeated (a time-ids vector given for the whole batch)."""
    if t is None or t.shape[0] == n:
        return t
    return t.repeat(n, *([1] * (t.ndim - 1))) if t.shape[0] == 1 else t


class _GuidedStableDiffusionXL(
    DiffusionPipeline,
    StableDiffusionMixin,
    FromSingleFileMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
    IPAdapterMixin,
):
    """Shared body of the SDXL pipelines: diffusers' input handling, guidance by the engine."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"

    #: Replay the UNet passes from CUDA graphs on a CUDA device (attnguide.sampling.CudaGraphPasses): the
    #: same results with far less launch overhead at small batch sizes. False runs every pass eagerly.
    cuda_graphs: bool = True
    #: When a SAG map is computed memory-flat (attnguide.engine.attention.MapLimits).
    map_limits: MapLimits = DEFAULT_MAP_LIMITS
    _optional_components = [
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
    ]
    # Per-branch tensors (as diffusers' SDXL PAG pipeline names them), never the CFG-concatenated batch:
    # ``prompt_embeds`` / ``add_text_embeds`` / ``add_time_ids`` are the conditional ones (batch rows each).
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
        "negative_pooled_prompt_embeds",
        "negative_add_time_ids",
    ]

    # Input handling is diffusers' own (maintained StableDiffusionXLPipeline code), not a copy.
    encode_prompt = _XL.encode_prompt
    encode_image = _XL.encode_image
    prepare_ip_adapter_image_embeds = _XL.prepare_ip_adapter_image_embeds
    prepare_extra_step_kwargs = _XL.prepare_extra_step_kwargs
    prepare_latents = _XL.prepare_latents
    _get_add_time_ids = _XL._get_add_time_ids
    upcast_vae = _XL.upcast_vae
    get_guidance_scale_embedding = _XL.get_guidance_scale_embedding
    _check_diffusers_inputs = _XL.check_inputs

    # diffusers 0.42 dropped these pipeline switches; the SD pipelines keep them, so do these.
    enable_vae_slicing = _GuidedStableDiffusion.enable_vae_slicing
    disable_vae_slicing = _GuidedStableDiffusion.disable_vae_slicing
    enable_vae_tiling = _GuidedStableDiffusion.enable_vae_tiling
    disable_vae_tiling = _GuidedStableDiffusion.disable_vae_tiling

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = (
            self.unet.config.sample_size
            if getattr(self, "unet", None) is not None and hasattr(self.unet.config, "sample_size")
            else 128
        )
        # Unlike diffusers (which watermarks whenever invisible-watermark is installed), None means no
        # watermark: outputs do not depend on which optional packages happen to be installed.
        if add_watermarker:
            if not is_invisible_watermark_available():
                raise ImportError(
                    "`add_watermarker=True` needs the invisible-watermark package "
                    "(pip install invisible-watermark)"
                )
            from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

            self.watermark = StableDiffusionXLWatermarker()
        else:
            self.watermark = None
        self.last_guider: Guider | None = None  # the engine of the last call (masks, layers)

    # ------------------------------------------------------------------ validation
    def _validate(
        self,
        *,
        prompt,
        prompt_2,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        denoising_end,
        guidance_scale,
        guidance_rescale,
        negative_prompt,
        negative_prompt_2,
        num_images_per_prompt,
        generator,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
        callback_steps,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Every check that can fail, before any model runs: ValueError naming the argument."""
        check_scale("guidance_scale", guidance_scale)
        check_scale("guidance_rescale", guidance_rescale)
        f = self.vae_scale_factor
        divisible_size("height", height, f, " (the VAE factor)")
        divisible_size("width", width, f, " (the VAE factor)")
        if timesteps is not None and sigmas is not None:
            raise ValueError("only one of `timesteps` or `sigmas` can be passed")
        set_ts = set(inspect.signature(self.scheduler.set_timesteps).parameters)
        for name, custom in (("timesteps", timesteps), ("sigmas", sigmas)):
            if custom is not None and name not in set_ts:
                raise ValueError(
                    f"`{name}`: the scheduler {type(self.scheduler).__name__} does not support custom {name}"
                )
        if timesteps is None and sigmas is None:
            positive_int("num_inference_steps", num_inference_steps)
        if denoising_end is not None and (
            isinstance(denoising_end, bool)
            or not isinstance(denoising_end, (int, float))
            or not 0.0 < denoising_end <= 1.0
        ):
            raise ValueError(f"`denoising_end` must be a fraction in (0, 1] or None, got {denoising_end!r}")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(
                f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}"
            )
        for name, emb, ndim in (
            ("prompt_embeds", prompt_embeds, 3),
            ("negative_prompt_embeds", negative_prompt_embeds, 3),
            ("pooled_prompt_embeds", pooled_prompt_embeds, 2),
            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, 2),
        ):
            if emb is not None and (not isinstance(emb, torch.Tensor) or emb.ndim != ndim):
                shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ValueError(f"`{name}` must be a {ndim}-d tensor (batch first), got {shape}")
        self._check_diffusers_inputs(
            prompt,
            prompt_2,
            height,
            width,
            callback_steps,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        batch_size = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else None
        if batch_size is None:
            batch_size = prompt_embeds.shape[0]
        for name, value in (
            ("prompt_2", prompt_2),
            ("negative_prompt", negative_prompt),
            ("negative_prompt_2", negative_prompt_2),
        ):
            _batch_of(name, value, batch_size)
        if prompt_embeds is not None and pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError("`pooled_prompt_embeds` must have as many rows as `prompt_embeds`")
        if (
            negative_prompt_embeds is not None
            and negative_pooled_prompt_embeds.shape[0] != negative_prompt_embeds.shape[0]
        ):
            raise ValueError(
                "`negative_pooled_prompt_embeds` must have as many rows as `negative_prompt_embeds`"
            )
        if isinstance(generator, list) and len(generator) != batch_size * num_images_per_prompt:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the batch has "
                f"{batch_size * num_images_per_prompt} images (prompts x num_images_per_prompt)"
            )

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        *,
        prompt,
        prompt_2,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        denoising_end,
        guidance_scale,
        negative_prompt,
        negative_prompt_2,
        num_images_per_prompt,
        eta,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
        output_type,
        return_dict,
        cross_attention_kwargs,
        guidance_rescale,
        original_size,
        crops_coords_top_left,
        target_size,
        negative_original_size,
        negative_crops_coords_top_left,
        negative_target_size,
        clip_skip,
        callback,
        callback_steps,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        sag: SAG | None,
        pag: PAG | None,
        record_masks: bool = False,
    ):
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self._validate(
            prompt=prompt,
            prompt_2=prompt_2,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            denoising_end=denoising_end,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_steps=callback_steps,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        original_size = _as_pair("original_size", original_size or (height, width))
        target_size = _as_pair("target_size", target_size or (height, width))
        crops_coords_top_left = _as_pair("crops_coords_top_left", crops_coords_top_left)
        negative_crops_coords_top_left = _as_pair(
            "negative_crops_coords_top_left", negative_crops_coords_top_left
        )
        if negative_original_size is not None:
            negative_original_size = _as_pair("negative_original_size", negative_original_size)
        if negative_target_size is not None:
            negative_target_size = _as_pair("negative_target_size", negative_target_size)

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        do_cfg = self.do_classifier_free_guidance

        # Micro-conditioning: diffusers' own helper, before any model call (it checks the UNet's
        # added-embedding width against the second text encoder's projection).
        if self.text_encoder_2 is None:
            if pooled_prompt_embeds is None:
                raise ValueError(
                    "`pooled_prompt_embeds` must be given when the pipeline has no `text_encoder_2`"
                )
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, torch.float32, projection_dim
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                torch.float32,
                projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids

        # Scales and layer names: the Guider resolves them now, so a bad one fails before any model call.
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
        n = batch_size * num_images_per_prompt
        device = self._execution_device

        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        dtype = prompt_embeds.dtype
        add_text_embeds = pooled_prompt_embeds.to(device)
        prompt_embeds = prompt_embeds.to(device)
        add_time_ids = add_time_ids.to(device=device, dtype=dtype).repeat(n, 1)
        negative_add_time_ids = negative_add_time_ids.to(device=device, dtype=dtype).repeat(n, 1)
        if do_cfg:
            negative_prompt_embeds = negative_prompt_embeds.to(device)
            negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(device)

        image_embeds: dict[str, list[torch.Tensor]] | None = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, n, do_cfg
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
            n, self.unet.config.in_channels, height, width, dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        if denoising_end is not None and isinstance(denoising_end, float) and 0 < denoising_end < 1:
            train_steps = self.scheduler.config.num_train_timesteps
            cutoff = round(train_steps - denoising_end * train_steps)
            num_inference_steps = len([ts for ts in timesteps if ts >= cutoff])
            timesteps = timesteps[:num_inference_steps]

        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(guidance_scale - 1).repeat(n)
            timestep_cond = self.get_guidance_scale_embedding(
                w, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        branch: dict[str, dict[str, torch.Tensor | None]] = {
            "cond": {"text": prompt_embeds, "pooled": add_text_embeds, "time_ids": add_time_ids},
            "uncond": {
                "text": negative_prompt_embeds,
                "pooled": negative_pooled_prompt_embeds,
                "time_ids": negative_add_time_ids,
            },
        }
        cache: dict[tuple[str, ...], dict[str, Any]] = {}

        def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            key = tuple(branches)
            if key not in cache:
                added: dict[str, Any] = {
                    "text_embeds": torch.cat([branch[b]["pooled"] for b in key]),
                    "time_ids": torch.cat([branch[b]["time_ids"] for b in key]),
                }
                if image_embeds is not None:
                    added["image_embeds"] = [
                        torch.cat([image_embeds[b][i] for b in key]) for i in range(len(image_embeds["cond"]))
                    ]
                kw: dict[str, Any] = {
                    "encoder_hidden_states": torch.cat([branch[b]["text"] for b in key]),
                    "added_cond_kwargs": added,
                }
                if timestep_cond is not None:
                    kw["timestep_cond"] = torch.cat([timestep_cond] * len(key))
                cache[key] = kw
            return self.unet(
                x, t, cross_attention_kwargs=cross_attention_kwargs, return_dict=False, **cache[key]
            )[0]

        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        names = {
            ("cond", "text"): "prompt_embeds",
            ("cond", "pooled"): "add_text_embeds",
            ("cond", "time_ids"): "add_time_ids",
            ("uncond", "text"): "negative_prompt_embeds",
            ("uncond", "pooled"): "negative_pooled_prompt_embeds",
            ("uncond", "time_ids"): "negative_add_time_ids",
        }

        def on_step_end(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            local = {"latents": latents} | {v: branch[b][k] for (b, k), v in names.items()}
            outputs = callback_on_step_end(
                self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
            )
            latents = outputs.pop("latents", latents)
            changed = False
            for (b, k), v in names.items():
                new = outputs.pop(v, branch[b][k])
                if new is not branch[b][k]:
                    branch[b][k] = _rows(new, n) if k == "time_ids" else new
                    changed = True
            if changed:
                cache.clear()
                if guider.graphs is not None:
                    guider.graphs.reset()
            # A callback may switch CFG off (diffusers' SDXLCFGCutoffCallback sets the scale to 0).
            if guider.do_cfg and self._guidance_scale != guider.guidance_scale:
                check_scale("guidance_scale", self._guidance_scale)
                guider.guidance_scale = self._guidance_scale if self.do_classifier_free_guidance else None
            return latents

        latents = denoise_loop(
            self,
            guider,
            model_fn,
            latents,
            timesteps,
            num_inference_steps=num_inference_steps,
            num_warmup_steps=num_warmup_steps,
            extra_step_kwargs=extra_step_kwargs,
            on_step_end=on_step_end if callback_on_step_end is not None else None,
            callback=callback,
            callback_steps=callback_steps,
        )

        if output_type != "latent":
            image = self._decode(latents)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        else:
            image = latents
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' SDXL decoding: fp16 VAEs upcast when configured, latents mean/std where the VAE has
        them."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        latents = latents.to(get_module_execution_device(self.vae))
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        return image

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
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def denoising_end(self):
        return self._denoising_end

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt


class StableDiffusionXLSAGPipeline(_GuidedStableDiffusionXL):
    """SDXL text-to-image with SAG (and blur guidance, PAG, CFG): diffusers' ``StableDiffusionXLPipeline``
    constructor and arguments, plus keyword-only guidance options.

    With ``sag_scale=0`` (and ``pag_scale=0``) it gives the numbers of diffusers'
    ``StableDiffusionXLPipeline``.
    ``sag_scale`` follows diffusers (s in out += s (u - degraded)); the degraded pass gets the same text,
    pooled text and ``time_ids`` as the branch it refers to (unconditional with CFG, else conditional).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        *,
        sag_scale: float = 0.75,
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
        record_masks: bool = False,
        **kwargs,
    ):
        """Generate images with CFG (``guidance_scale`` > 1), SAG (``sag_scale`` > 0) and, optionally, PAG.

        The positional arguments are diffusers' ``StableDiffusionXLPipeline.__call__`` ones with the same
        defaults and meaning (its deprecated ``callback`` / ``callback_steps`` keywords are accepted too).
        The keyword-only ones: ``sag_layers`` (default: the mid block's first self-attention),
        ``sag_threshold`` (psi), ``sag_blur_kernel_size`` / ``sag_blur_sigma``, ``sag_mask`` ("attention" =
        SAG, "global" = blur guidance, or an ablation mask), step windows, PAG (``pag_scale`` > 0 on
        ``pag_applied_layers``), and ``record_masks`` (the summed SAG masks land in
        ``self.last_guider.mask_sum``). Tensors handed to ``callback_on_step_end`` are per branch (see
        ``_callback_tensor_inputs``), not the CFG-concatenated batch.
        """
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:
            raise TypeError(f"__call__() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        return self._generate(
            prompt=prompt,
            prompt_2=prompt_2,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            denoising_end=denoising_end,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            clip_skip=clip_skip,
            callback=callback,
            callback_steps=callback_steps,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
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


class StableDiffusionXLPAGPipeline(PAGLayersMixin, _GuidedStableDiffusionXL):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGPipeline`` (same constructor with
    ``pag_applied_layers``, same arguments, same results), with SAG available beside PAG.

    Layer strings keep diffusers' meaning ("mid", "down", "up", "mid_block.attentions.0", a regex, a full
    path), except that a number no longer matches a longer one ("blocks.1" is not "blocks.10"). A string that
    matches no self-attention layer raises ValueError before sampling.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        pag_applied_layers: str | list[str] = "mid",
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self.set_pag_applied_layers(pag_applied_layers)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
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

        The arguments up to ``pag_adaptive_scale`` are diffusers' ``StableDiffusionXLPAGPipeline.__call__``
        ones with the same defaults and meaning; the keyword-only ones add SAG and step windows. Tensors
        handed to ``callback_on_step_end`` are per branch (see ``_callback_tensor_inputs``).
        """
        pag = pag_from_args(pag_scale, pag_adaptive_scale, self.pag_applied_layers, pag_window)
        self._pag_scale = pag_scale
        self._pag_adaptive_scale = pag_adaptive_scale
        return self._generate(
            prompt=prompt,
            prompt_2=prompt_2,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            denoising_end=denoising_end,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            clip_skip=clip_skip,
            callback=None,
            callback_steps=None,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
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


__all__ = ["StableDiffusionXLPAGPipeline", "StableDiffusionXLSAGPipeline"]
