"""Self-Attention Guidance and blur guidance (Hong et al., ICCV 2023, arXiv:2210.00939).

Notation of the paper; x_t = a x0 + b eps is the step's noise parameterisation
(engine/parameterization.py: a = sqrt(abar), b = sqrt(1 - abar) for VP schedules; sigma and flow-matching
schedules there too):

    x0_hat   = (x_t - b eps) / a                                         (Eq. 2)
    A        = mean over heads, sum over queries of the layer's map      (Eq. 13)
    M        = 1[A > psi], reshaped to the layer's grid, upsampled        (Eq. 14)
    x0_tilde = M * Blur(x0_hat) + (1 - M) * x0_hat                       (Eq. 15)
    x_tilde  = a x0_tilde + b eps                                        (re-noise, the same eps)
    out     += s (ref - model(x_tilde))                                  (Eq. 16, Alg. 1)

with ref the unconditional prediction under CFG (as diffusers: the degraded input is built from the
unconditional branch's map and eps) and the conditional one without. Blur guidance (Sec. 5.1) is M = 1
everywhere; the ablation masks of Table 5 (random, square, high-frequency, random tokens) replace M.
Eq. 15 on x0 equals the paper's form on x_t because re-noising is affine with the same eps. Only the
latent channels are degraded, frame by frame for video; conditioning channels stay (engine/layout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_layers, check_number
from ..degrade import (
    MASK_KINDS,
    Blur,
    attention_mask,
    combine_attention_maps,
    gaussian_blur_2d,
    highfreq_mask,
    infer_grid,
    mean_pixel_blur,
    random_mask,
    random_token_mask,
    square_mask,
)
from ..layers import default_sag_layer, resolve_layers
from ..layout import as_images, from_images
from ..parameterization import NoiseLevel, predict_eps, predict_x0, renoise
from .base import AppParam, AppSpec, Method, StepContext, Term, scale_param

__all__ = ["SAG", "sag_degraded_input", "sag_update"]


def sag_update(sag_ref: Tensor, out_degraded: Tensor, sag_scale: float) -> Tensor:
    """SAG's term (Eq. 16): s_sag (ref - degraded), what SAG adds to the prediction."""
    return sag_scale * (sag_ref - out_degraded)


def sag_degraded_input(
    x_in: Tensor,
    model_output: Tensor,
    level: NoiseLevel,
    prediction_type: str,
    mask: Tensor,
    blur_kernel_size: int = 9,
    blur_sigma: float = 1.0,
    *,
    blur: Blur | None = None,
) -> Tensor:
    """x_tilde_t of Alg. 1: blur x0_hat where ``mask`` is 1 and re-noise with the model's own eps.

    ``x_in`` is the model input at this step (after ``scale_model_input``; latent channels only, 2-D
    images), ``model_output`` the raw output for it, ``level`` its noise level x_in = a x0 + b eps,
    ``mask`` (B, 1 or C, H, W) in {0, 1} (all ones: blur guidance). ``blur`` replaces the
    Gaussian of ``blur_kernel_size`` / ``blur_sigma`` by another strategy. Returns a model input.
    """
    x0 = predict_x0(x_in, model_output, level, prediction_type)
    eps = predict_eps(x_in, model_output, level, prediction_type)
    blurred = blur(x0) if blur is not None else gaussian_blur_2d(x0, blur_kernel_size, blur_sigma)
    x0_tilde = blurred * mask + x0 * (1 - mask)
    return renoise(x0_tilde, eps, level)


_PARAMS = (
    scale_param("sag", "SAG", 0.75),
    AppParam("mask", "attention", "mask"),
    AppParam(
        "sigma",
        1.0,
        "blur_sigma",
        "--blur-sigma",
        1.0,
        "Blur sigma",
        low=0.0,
        low_open=True,
        caption="blur sigma",
        help="Gaussian blur sigma of SAG and blur guidance",
    ),
    AppParam("kernel", 9, "blur_kernel_size"),
    AppParam("fraction", None),
    AppParam("average", False),
    AppParam("window", (0.0, 1.0), "window"),
)


@dataclass(frozen=True)
class SAG(Term):
    """Self-Attention Guidance (mask="attention") or blur guidance (mask="global") and its ablations
    (Hong et al., arXiv:2210.00939, Alg. 1 and Eq. 12-16; blur guidance Sec. 5.1; ablations Table 5).

    scale: s of Eq. 16 (diffusers convention; 0 disables). layers: self-attention layer path(s) or
    pattern(s) whose map gives the mask (None: the model's default, the mid block's first
    self-attention). threshold: psi of Eq. 14, > 0 (1.0 = the mean of the map). blur_kernel_size,
    blur_sigma: the Gaussian blur (diffusers: 9 and 1.0). mask: "attention" (SAG), "global" (blur
    guidance), or the Table 5 ablations "random", "square", "highfreq" that mask ``mask_fraction`` of
    the pixels, and "random_tokens" (that fraction of the SAG layer's attention tokens, chosen at random:
    the attention mask's block size). window: (start, stop) fractions of the sampling steps where the
    term is applied; outside it the extra model pass is skipped. blur: another blur strategy (a
    function of x0_hat, e.g. :func:`attnguide.engine.degrade.mean_pixel_blur`) in place of the Gaussian;
    None keeps the Gaussian.
    """

    name: ClassVar[str] = "sag"
    title: ClassVar[str] = "SAG"
    default_on_in_pipelines: ClassVar[bool] = True
    paper: ClassVar[str] = "arXiv:2210.00939"
    rows: ClassVar[int] = 0  # its weak prediction has another input: a call of its own
    separate_call: ClassVar[str] = "uncond"
    reads_prediction: ClassVar[bool] = True
    pipeline_scale: ClassVar[float] = 0.75  # attnguide's SAG pipelines sample with SAG unless told not to
    app: ClassVar[AppSpec] = AppSpec(
        params=_PARAMS,
        methods={
            "blur": Method(
                {"mask": "global"},
                "blur guidance",
                "SAG's Sec. 5.1",
                "as SAG, with the whole x0 estimate blurred (no mask)",
            )
        },
        eval_scale=None,
        passes="+1 model call (its input differs)",
        weak="the model on x_t with its x0 estimate blurred where the self-attention map is high, re-noised",
    )

    scale: float = 0.75
    layers: str | Sequence[str] | None = None
    threshold: float = 1.0
    blur_kernel_size: int = 9
    blur_sigma: float = 1.0
    mask: str = "attention"
    mask_fraction: float = 0.4
    window: tuple[float, float] = (0.0, 1.0)
    blur: Blur | None = field(default=None, metadata={"keyword": None})

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        check_layers("sag_layers", self.layers)
        check_number(
            "sag_threshold",
            self.threshold,
            minimum=0.0,
            open_minimum=True,
            note=" (psi of Eq. 14, compared with an attention map whose mean is 1)",
        )
        k = self.blur_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"`sag_blur_kernel_size` must be an odd positive integer, got {k!r}")
        check_number("sag_blur_sigma", self.blur_sigma, minimum=0.0, open_minimum=True)
        if not isinstance(self.mask, str) or self.mask not in MASK_KINDS:
            raise ValueError(f"`sag_mask` must be one of {MASK_KINDS}, got {self.mask!r}")
        check_number("sag_mask_fraction", self.mask_fraction, minimum=0.0, maximum=1.0, open_minimum=True)
        if self.blur is not None and not callable(self.blur):
            raise ValueError(f"`sag_blur` must be a function of a (B, C, H, W) tensor, got {self.blur!r}")

    @property
    def needs_map(self) -> bool:
        """Whether the SAG layer's map is captured: the attention mask's source, and the token grid of the
        "random_tokens" mask (which uses only the grid)."""
        return self.mask in ("attention", "random_tokens")

    # -------------------------------------------------------------------- the protocol
    def capture_layers(self, model: nn.Module) -> list[str]:
        if not self.needs_map:
            return []
        names = self.layers if self.layers is not None else default_sag_layer(model)
        return resolve_layers(model, names, argument="sag_layers")

    def reference(self, ctx: StepContext) -> Tensor:
        """The unconditional prediction under CFG (diffusers), else the conditional one."""
        return ctx.outputs.out_uncond if ctx.cfg else ctx.outputs.out_cond

    def extra_pass(self, ctx: StepContext) -> Tensor:
        """The model on the degraded input (Alg. 1), the reference branch's conditioning."""
        latent, cond = ctx.layout.split_input(ctx.x_in)
        level = ctx.level()
        images, ref_images = as_images(latent), as_images(self.reference(ctx))
        mask = self.mask_for(images, ref_images, level, ctx)
        ctx.record_mask(mask)
        degraded = sag_degraded_input(
            images,
            ref_images,
            level,
            ctx.prediction_type,
            mask,
            self.blur_kernel_size,
            self.blur_sigma,
            blur=self.blur,
        )
        x_deg = ctx.layout.join_input(from_images(degraded, latent), cond)
        return ctx.call(x_deg, ["uncond" if ctx.cfg else "cond"])

    def mask_for(self, images: Tensor, ref: Tensor, level: NoiseLevel, ctx: StepContext) -> Tensor:
        """M of Eq. 14 for the reference branch's images (frames of a video: one row each), shape
        (B, 1, H, W). The "random_tokens" mask takes only the token grid of the captured map (with
        several SAG layers, the finest grid)."""
        b, size = images.shape[0], tuple(images.shape[-2:])
        opts = {"device": images.device, "dtype": images.dtype}
        if self.mask == "global":
            return torch.ones((b, 1, *size), **opts)
        if self.mask == "random":
            return random_mask((b, 1, *size), self.mask_fraction, ctx.generator).to(**opts)
        if self.mask == "square":
            return square_mask((b, 1, *size), self.mask_fraction, ctx.generator).to(**opts)
        if self.mask == "highfreq":
            return highfreq_mask(predict_x0(images, ref, level, ctx.prediction_type), self.mask_fraction)
        maps = _captured_maps(ctx, b, size)
        if self.mask == "random_tokens":
            grid = max((g for _, g in maps), key=lambda g: g[0] * g[1])
            return random_token_mask((b, 1, *size), grid, self.mask_fraction, ctx.generator).to(**opts)
        if len(maps) == 1:
            return attention_mask(maps[0][0], maps[0][1], size, self.threshold)
        return (combine_attention_maps(maps, size) > self.threshold).to(maps[0][0].dtype)

    # -------------------------------------------------------------------- the applications' side
    @classmethod
    def from_app(cls, values: dict) -> SAG | None:
        if values["scale"] == 0:
            return None
        fraction = values["fraction"]
        return cls(
            scale=values["scale"],
            blur_kernel_size=values["kernel"],
            blur_sigma=values["sigma"],
            mask=values["mask"],
            mask_fraction=fraction if fraction is not None else 0.4,
            window=tuple(values["window"]),
            blur=mean_pixel_blur if values["average"] else None,
        )

    @classmethod
    def app_canonical(cls, values: dict) -> dict:
        values = super().app_canonical(values)
        if values["mask"] in ("attention", "global"):
            values = {**values, "fraction": None}
        if values["average"]:
            values = {**values, "sigma": 1.0, "kernel": 9}
        return values

    @classmethod
    def app_key(cls, values: dict) -> str:
        if values["scale"] == 0:
            return ""
        s = f"sag{values['scale']:g}"
        if values["mask"] != "attention":
            s += f"-{values['mask']}"
        if values["fraction"] is not None:
            s += f"{values['fraction']:.6g}"
        if values["average"]:
            s += "-avgpixel"
        elif (values["sigma"], values["kernel"]) != (1.0, 9):
            s += f"-sigma{values['sigma']:g}-k{values['kernel']}"
        if tuple(values["window"]) != (0.0, 1.0):
            s += f"-win{values['window'][0]:g}-{values['window'][1]:g}"
        return s


def _captured_maps(ctx: StepContext, b: int, size: tuple[int, int]) -> list:
    """The maps the SAG layers recorded in this step's batched call, each with its token grid."""
    maps = []
    for name in ctx.capture_layers("sag"):
        if name not in ctx.maps:
            raise RuntimeError(f"SAG layer {name!r} was not called during the model pass")
        agg, grid = ctx.maps[name]
        frames = b // agg.shape[0] if agg.shape[0] < b and b % agg.shape[0] == 0 else 1
        if grid is None and frames > 1 and agg.shape[1] % frames == 0:
            agg = _per_frame(agg, frames)  # a video transformer's frames in one sequence
        if agg.shape[0] != b:
            raise ValueError(
                f"`sag_layers`: layer {name!r} saw {agg.shape[0]} rows for {b} images; choose a "
                "spatial self-attention layer (not a temporal one)"
            )
        maps.append((agg, grid if grid is not None else infer_grid(agg.shape[1], *size)))
    return maps


def _per_frame(agg: Tensor, frames: int) -> Tensor:
    """The map of a layer holding a video's ``frames`` in one sequence (frame-major tokens), as one row
    per frame, each renormalised to mean 1 over its keys (psi = 1 stays each frame's mean)."""
    rows = agg.reshape(agg.shape[0] * frames, agg.shape[1] // frames)
    return rows / rows.mean(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
