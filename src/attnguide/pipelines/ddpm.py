"""Pixel-space UNet pipeline (``UNet2DModel``, as diffusers' ``DDPMPipeline``) with SAG, blur guidance,
PAG, classifier guidance (ADM) and, for class-conditional models with a null label, classifier-free
guidance.

Covers the paper's unconditional and class-conditional pixel models (ADM, IDDPM), learned variance
included (2C output channels: the variance of the conditional pass is kept), and its Table 3 (SAG with
classifier guidance).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from ..engine.checks import check_scale, positive_int
from ..engine.guidance import ClassifierGuidance, GradFn, classifier_grad_fn
from ._guided import OwnLoopMixin, call_arguments
from .call_checks import check_class_labels, image_size
from .options import GuidanceOptions, reject_unknown, with_guidance_options


class DDPMSAGPipeline(OwnLoopMixin, DiffusionPipeline):
    """Sampling from a pixel-space ``UNet2DModel`` with SAG / blur guidance / PAG / CFG, on any scheduler.

    Unconditional models: ``pipe(batch_size=8, sag_scale=0.75)``. Class-conditional models
    (``num_class_embeds`` set): pass ``class_labels``; CFG (``guidance_scale`` > 1) uses
    ``null_class_label`` as the unconditional label, by default the last class embedding (the
    convention of label-dropout training, as DiT's). Without ``class_labels`` a class-conditional model
    samples unconditionally with the null label.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int | None:
        """Number of class embeddings of the UNet (None for an unconditional model)."""
        return getattr(self.unet.config, "num_class_embeds", None)

    def _labels(
        self,
        class_labels: Any,
        batch_size: int,
        null_label: int | None,
        device: torch.device,
        classifier_classes: int | None = None,
    ) -> torch.Tensor | None:
        """The conditional branch's labels (checked), one per image; None for an unconditional UNet, where
        ``class_labels`` are only allowed as a classifier module's labels (``classifier_classes``: its
        number of classes, 0 where unknown)."""
        n = self.num_classes
        if n is None:
            if class_labels is not None and classifier_classes is None:
                raise ValueError("`class_labels` given, but this UNet is unconditional (no num_class_embeds)")
            if class_labels is None:
                return None
            n = classifier_classes or 2**31 - 1
        if class_labels is None:
            if null_label is None:
                raise ValueError("`class_labels` is required: this class-conditional UNet has no null label")
            class_labels = [null_label]
        labels = check_class_labels("class_labels", class_labels, n)
        if len(labels) == 1:
            labels = labels * batch_size
        if len(labels) != batch_size:
            raise ValueError(
                f"`class_labels` must hold 1 or batch_size={batch_size} labels, got {len(labels)}"
            )
        return torch.tensor(labels, dtype=torch.long, device=device)

    def _null_label(self, null_class_label: Any) -> int | None:
        """The unconditional label (checked): ``null_class_label``, else the last class embedding."""
        n = self.num_classes
        if null_class_label is None:
            return n - 1 if n else None
        if n is None:
            raise ValueError("`null_class_label` given, but this UNet is unconditional (no num_class_embeds)")
        label = null_class_label
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
            raise ValueError(
                f"`null_class_label` must be an integer in [0, {n - 1}] (a class embedding of this UNet), "
                f"got {null_class_label!r}"
            )
        return null_class_label

    def check_call(self, call: dict[str, Any]) -> tuple[torch.Tensor | None, int | None, tuple[int, ...]]:
        """Every check that can fail, before any model runs (ValueError / TypeError naming the argument);
        returns the labels, the null label and the noise shape."""
        batch_size = positive_int("batch_size", call["batch_size"])
        size = self.unet.config.sample_size
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        height, width = image_size(call, size if isinstance(size, int) else tuple(size), factor)
        shape = (batch_size, self.unet.config.in_channels, height, width)
        self.check_loop_arguments(
            self.unet,
            shape=shape,
            **{k: call[k] for k in ("latents", "generator", "num_inference_steps", "eta", "guidance_scale")},
            output_type=call["output_type"],
            callback=call["callback"],
        )
        null_label = self._null_label(call["null_class_label"])
        classifier = call["classifier"]
        module_classes = _classifier_classes(classifier) if isinstance(classifier, nn.Module) else None
        device = self._execution_device
        labels = self._labels(call["class_labels"], batch_size, null_label, device, module_classes)
        if call["guidance_scale"] > 1.0 and self.num_classes is None:
            raise ValueError("`guidance_scale` > 1 needs a class-conditional UNet (num_class_embeds)")
        return labels, null_label, shape

    def classifier_term(self, call: dict[str, Any], labels: torch.Tensor | None) -> ClassifierGuidance | None:
        """The call's classifier guidance (None without ``classifier`` or at scale 0), checked before any
        model runs: a classifier module ``classifier(x, t) -> logits`` is guided towards the call's
        ``class_labels`` (ADM's ``cond_fn``: :func:`classifier_grad_fn`), a function is the gradient
        ``grad_fn(x, t)`` itself (closing over its own labels)."""
        classifier, scale = call["classifier"], call["classifier_scale"]
        check_scale("classifier_scale", scale, minimum=-float("inf"))
        if classifier is None:
            return None
        grad_fn: GradFn
        if isinstance(classifier, nn.Module):
            if call["class_labels"] is None or labels is None:
                raise ValueError(
                    "`class_labels` is required with a classifier module: classifier guidance steers "
                    "towards them (or pass `classifier` as a function grad_fn(x, t))"
                )
            classes = _classifier_classes(classifier)
            if classes and int(labels.max()) >= classes:
                raise ValueError(
                    f"`class_labels` must be classes of the classifier (0 to {classes - 1}) for classifier "
                    f"guidance, got {labels.tolist()}"
                )
            weight = next(classifier.parameters(), None)
            if weight is not None and weight.device != labels.device:
                raise ValueError(
                    f"`classifier` is on {weight.device}, the pipeline runs on {labels.device}; move it there"
                )
            grad_fn = classifier_grad_fn(classifier, labels)
        elif callable(classifier):
            grad_fn = classifier
        else:
            raise ValueError(
                "`classifier` must be a classifier module classifier(x, t) -> logits or a function "
                f"grad_fn(x, t) -> grad_x log p(y | x_t), got {classifier!r}"
            )
        return ClassifierGuidance(scale, grad_fn) if scale != 0 else None

    @torch.no_grad()
    @with_guidance_options()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        null_class_label: int | None = None,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        classifier: nn.Module | GradFn | None = None,
        classifier_scale: float = 1.0,
        **guidance: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images. The first five arguments are diffusers' ``DDPMPipeline`` ones.

        ``guidance_scale`` > 1 enables CFG (class-conditional models). ``sag_scale`` (0 disables) and the
        ``sag_*`` options are those of :class:`attnguide.SAG`; ``sag_mask="global"`` is blur guidance.
        ``pag_scale`` > 0 adds PAG in ``pag_applied_layers``. ``classifier`` adds classifier guidance
        (ADM) with ``classifier_scale`` s (ADM's ``classifier_scale``; 0 disables): a noise-aware
        classifier module ``classifier(x_t, t) -> logits`` (in eval mode, on the pipeline's device),
        guided towards ``class_labels`` (for an unconditional UNet these are the classifier's labels
        only), or a gradient function ``grad_fn(x_t, t)`` (:class:`ClassifierGuidance`). Returns images
        in [0, 1].
        """
        call = call_arguments(locals())
        options = GuidanceOptions.take(guidance)
        reject_unknown(guidance, (), "DDPMSAGPipeline.__call__")
        options.check()  # bad options fail here, before any model runs
        labels, null_label, shape = self.check_call(call)
        classifier_term = self.classifier_term(call, labels)
        if self.num_classes is None:
            labels = None  # an unconditional UNet: the labels were the classifier's only
        do_cfg = guidance_scale > 1.0 and labels is not None and class_labels is not None
        branch_labels = None
        if labels is not None:
            null = torch.full_like(labels, null_label) if null_label is not None else None
            branch_labels = {"cond": labels, "uncond": null}
        cache: dict[tuple[str, ...], torch.Tensor | None] = {}

        def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            key = tuple(branches)
            if key not in cache:
                cache[key] = None if branch_labels is None else torch.cat([branch_labels[b] for b in key])
            return self.unet(x, t, class_labels=cache[key]).sample

        sampling = {
            "guidance_scale": guidance_scale if do_cfg else None,
            "shape": shape,
            "latents": latents,
            "generator": generator,
            "num_inference_steps": num_inference_steps,
            "eta": eta,
            "callback": callback,
        }
        image = self.sample_guided(self.unet, model_fn, options, classifier=classifier_term, **sampling)
        return self.image_output(image, output_type, return_dict)


def _classifier_classes(classifier: nn.Module) -> int:
    """A classifier module's number of classes (its ``num_classes`` attribute or config entry), 0 where
    it says none."""
    n = getattr(classifier, "num_classes", None)
    config = getattr(classifier, "config", None)
    if n is None and isinstance(config, dict):
        n = config.get("num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0
