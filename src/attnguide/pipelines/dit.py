"""DiT (``DiTTransformer2DModel``, class labels, patches, learned sigma) with SAG / PAG and CFG.

The SAG map comes from one transformer block's self-attention, on the patch grid (H/p x W/p); the
paper's Table 4 combines it with CFG. Without a named layer, SAG uses the middle block and PAG block 1
(diffusers' PAG default for DiTs).
"""

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
)
from diffusers.schedulers import KarrasDiffusionSchedulers

from ._guided import OwnLoopMixin, call_arguments
from .call_checks import check_class_labels
from .options import GuidanceOptions, reject_unknown, with_guidance_options

#: diffusers' PAG default for DiTs: block 1 ("mid" matches no layer of a transformer).
_GUIDANCE_DEFAULTS = {"pag_applied_layers": "blocks.1"}


class DiTSAGPipeline(OwnLoopMixin, DiffusionPipeline):
    """DiT class-conditional sampling with CFG, SAG, blur guidance and PAG, on any scheduler.

    Same constructor as diffusers' ``DiTPipeline``; ``__call__`` takes its arguments (class_labels,
    guidance_scale=4.0, generator, num_inference_steps=50, output_type, return_dict) and the guidance
    options. The null label for CFG is the transformer's ``num_embeds_ada_norm`` (1000 for ImageNet DiTs).
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
        id2label: dict[int, str] | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.labels: dict[str, int] = {}
        if id2label is not None:
            for key, value in id2label.items():
                for label in value.split(","):
                    self.labels[label.lstrip().rstrip()] = int(key)
            self.labels = dict(sorted(self.labels.items()))

    get_label_ids = DiTPipeline.get_label_ids

    def check_call(self, call: dict[str, Any]) -> tuple[list[int], tuple[int, ...]]:
        """Every check that can fail, before any model runs (ValueError / TypeError naming the argument);
        returns the labels and the noise shape."""
        labels = check_class_labels(
            "class_labels", call["class_labels"], self.transformer.config.num_embeds_ada_norm
        )
        config = self.transformer.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        self.check_loop_arguments(
            self.transformer,
            shape=shape,
            **{k: call[k] for k in ("latents", "generator", "num_inference_steps", "eta", "guidance_scale")},
            output_type=call["output_type"],
        )
        return labels, shape

    @torch.no_grad()
    @with_guidance_options(**_GUIDANCE_DEFAULTS)
    def __call__(
        self,
        class_labels: int | Sequence[int],
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        **guidance: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label. ``guidance_scale`` > 1 enables CFG (as ``DiTPipeline``)."""
        call = call_arguments(locals())
        options = GuidanceOptions.take(guidance, **_GUIDANCE_DEFAULTS)
        reject_unknown(guidance, (), "DiTSAGPipeline.__call__")
        options.check()  # bad options fail here, before any model runs
        labels, shape = self.check_call(call)
        batch = len(labels)
        null = self.transformer.config.num_embeds_ada_norm
        device = self._execution_device
        ids = {
            "cond": torch.tensor(labels, device=device),
            "uncond": torch.full((batch,), null, device=device),
        }
        cache: dict[tuple[str, ...], torch.Tensor] = {}

        def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            key = tuple(branches)
            if key not in cache:
                cache[key] = torch.cat([ids[b] for b in key])
            timesteps = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
            return self.transformer(x, timestep=timesteps, class_labels=cache[key]).sample

        latents = self.sample_guided(
            self.transformer,
            model_fn,
            options,
            guidance_scale=guidance_scale if guidance_scale > 1 else None,
            shape=shape,
            latents=latents,
            generator=generator,
            num_inference_steps=num_inference_steps,
            eta=eta,
        )
        samples = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return self.image_output(samples, output_type, return_dict)
