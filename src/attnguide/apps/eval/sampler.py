"""Sampling one arm from fixed seeds: sample ``i`` always starts from the noise of seed ``seed + i`` and
(class-conditional arms) label ``i mod 10``, so every arm sees the same starting points. Arms with
classifier guidance are steered towards those labels by the model's noise-aware classifier
(:mod:`attnguide.apps.train.noisy_classifier`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ...engine.guidance import ClassifierGuidance
from ...engine.step import Guider, sample_loop, scheduler_step_kwargs
from ...pipelines import DDPMSAGPipeline
from ...pipelines.schedulers import scheduler_from_name
from ..arms import Arm
from ..images import sample_shape
from ..loading import load_pipeline
from ..train.noisy_classifier import cond_fn, load_noisy_classifier

__all__ = ["Sampler", "load_model"]


def load_model(model: str, device: str) -> tuple[Any, Any]:
    """(unet, scheduler config) of a pixel-space model folder (the bundled layout, or a bare UNet2DModel)."""
    pipe = load_pipeline(model, device)
    if not isinstance(pipe, DDPMSAGPipeline):
        raise SystemExit(f"error: --model {model!r}: attnguide eval needs a pixel-space UNet2DModel")
    return pipe.unet.eval(), pipe.scheduler.config


@dataclass
class Sampler:
    """The model, scheduler settings and seeds: ``sample(arm, indices, shard)`` gives the images in [0, 1].

    ``classifier``: the noise-aware classifier of the arms with classifier guidance, ``classifier(x_t, t)
    -> logits``; None loads it when an arm first needs it, from ``classifier_path`` (a
    ``noisy_classifier/`` folder or a model folder holding one; None: the bundled model's).
    """

    unet: Any
    scheduler_config: Any
    scheduler_name: str
    steps: int
    seed: int
    device: str
    num_class_embeds: int | None = None
    classifier_path: str | None = None
    classifier: nn.Module | None = field(default=None, repr=False)

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional branch (the last class embedding), None for unconditional models."""
        return None if self.num_class_embeds is None else self.num_class_embeds - 1

    def with_steps(self, steps: int) -> Sampler:
        """The same sampler with another number of steps (the cost experiment's warm-up)."""
        return replace(self, steps=steps)

    def noisy_classifier(self) -> nn.Module:
        """The classifier of classifier guidance (:attr:`classifier`, loaded once where it is None)."""
        if self.classifier is None:
            config = self.unet.config
            if self.classifier_path is None and (config.in_channels, config.sample_size) != (1, 28):
                raise ValueError(
                    "`classifier_path`: the bundled noisy classifier is for 28x28 digits; give this model's "
                    "noise-aware classifier for classifier guidance"
                )
            self.classifier = load_noisy_classifier(self.classifier_path, self.device)
        return self.classifier

    def classifier_term(self, arm: Arm, labels: torch.Tensor | None) -> ClassifierGuidance | None:
        """The classifier guidance of ``arm`` towards ``labels`` (the conditional branch's, one per
        sample): ADM's gradient of log p(y | x_t) from :meth:`noisy_classifier`. None without it."""
        if not arm.uses_classifier:
            return None
        if not arm.conditional or labels is None:
            raise ValueError(f"arm {arm.key}: classifier guidance needs a conditional arm (its labels)")
        return ClassifierGuidance(arm.classifier_scale, cond_fn(self.noisy_classifier(), labels))

    def guider(self, arm: Arm, shard: int, labels: torch.Tensor | None = None) -> Guider:
        """A fresh scheduler and the guidance of ``arm``; the random / square masks draw from a generator
        seeded by the shard, so a shard's samples do not depend on which process makes them.
        ``labels``: the conditional labels, which an arm with classifier guidance steers towards."""
        sched = scheduler_from_name(self.scheduler_name, self.scheduler_config)
        sched.set_timesteps(self.steps * arm.steps_multiplier, device=self.device)
        return Guider(
            self.unet,
            sched,
            guidance_scale=arm.cfg_scale,
            **arm.engine_terms(),
            classifier=self.classifier_term(arm, labels),
            record_masks=arm.uses_attention_mask,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 + shard),
        )

    def _labels(self, arm: Arm, indices: Sequence[int]) -> dict[str, torch.Tensor] | None:
        """Class labels of the "cond" and "uncond" branches (None for an unconditional model)."""
        if self.num_class_embeds is None:
            return None
        real = self.num_class_embeds - 1
        null = torch.full((len(indices),), self.null_label, dtype=torch.long, device=self.device)
        cond = torch.tensor([i % real for i in indices], device=self.device) if arm.conditional else null
        return {"cond": cond, "uncond": null}

    @torch.no_grad()
    def sample(self, arm: Arm, indices: Sequence[int], shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, C, H, W) float32 in [0, 1] and the per-sample mean attention-mask fraction (NaN
        where the arm has no attention mask). Sample ``i`` starts from the noise of seed ``seed + i``; the
        scheduler's own noise (stochastic schedulers) comes from the same per-sample generator."""
        if (arm.conditional or arm.cfg_scale is not None) and self.num_class_embeds is None:
            raise ValueError("class-conditional arm on a model without class embeddings")
        config = self.unet.config
        h, w = sample_shape(config.sample_size)
        gens = [torch.Generator().manual_seed(self.seed + i) for i in indices]
        noise = torch.cat([torch.randn((1, config.in_channels, h, w), generator=g) for g in gens])
        labels = self._labels(arm, indices)
        guider = self.guider(arm, shard, None if labels is None else labels["cond"])
        sched = guider.scheduler
        latents = noise.to(self.device) * sched.init_noise_sigma

        def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            y = None if labels is None else torch.cat([labels[b] for b in branches])
            return self.unet(x, t, class_labels=y).sample

        step_kw = scheduler_step_kwargs(sched, gens, 0.0)
        x = sample_loop(guider, model_fn, latents, extra_step_kwargs=step_kw)
        images = (x / 2 + 0.5).clamp(0, 1).float().cpu().numpy()
        if guider.mask_sum is not None:
            steps = max(1, guider.mask_steps)
            frac = (guider.mask_sum.float().mean(dim=(1, 2, 3)) / steps).cpu().numpy()
        else:
            frac = np.full(len(indices), np.nan)
        return images.astype(np.float32), frac.astype(np.float32)
