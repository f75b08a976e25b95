"""The guidance terms and how they combine: the formulas, in one place.

Papers: SAG, Hong et al., ICCV 2023, arXiv:2210.00939; PAG, Ahn et al. 2024, arXiv:2403.17377; CFG, Ho &
Salimans 2022, arXiv:2207.12598; CFG rescale, Lin et al. 2023, arXiv:2305.08891.
Notation of the SAG paper. Every term is "prediction minus a weaker
prediction", times its own scale s (diffusers' and ComfyUI's convention; the official ADM code passes
1 + s instead). Predictions are the model's raw outputs (eps, v or x0, whichever it predicts), as in
diffusers' SAG and PAG pipelines.

    CFG   (Ho & Salimans, paper Eq. 4):  out = u + w (c - u)                       [w = guidance_scale]
    SAG   (Alg. 1, Eq. 16):              out += s_sag (ref - model(x_tilde_t))     [ref = u with CFG, else c]
    blur  (Sec. 5.1):                    as SAG with the mask M = 1 everywhere
    PAG   (Ahn et al. 2024):             out += s_pag (c - model_identity_attn(x_t))

where x_tilde_t comes from :func:`sag_degraded_input` (Alg. 1 / Eq. 13-15):

    x0_hat   = (x_t - b eps) / a,    a = sqrt(abar), b = sqrt(1 - abar)              (Eq. 2)
    x0_tilde = M * Blur(x0_hat) + (1 - M) * x0_hat                                   (Eq. 15, M from Eq. 14)
    x_tilde  = a x0_tilde + b eps                                                    (re-noise, same eps)

with x_t = a x0 + b eps the step's noise parameterisation (engine/parameterization.py: variance
preserving and sigma schedules; eps / v / x0 outputs converted there). Only the latent channels are
degraded, frame by frame for video; conditioning channels of the input stay (engine/layout.py).

Eq. 15 written on x0 (blur x0_hat under the mask, then re-noise) equals the paper's form on x_t
(mix x_t and the re-noised blur with M), because re-noising is affine with the same eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .checks import check_layers, check_number, check_scale, check_window
from .degrade import MASK_KINDS, Blur, gaussian_blur_2d
from .parameterization import NoiseLevel, predict_eps, predict_x0, renoise


@dataclass(frozen=True)
class SAG:
    """Self-Attention Guidance (mask="attention") or blur guidance (mask="global") and its ablations
    (Hong et al., arXiv:2210.00939, Alg. 1 and Eq. 12-16; blur guidance Sec. 5.1; ablations Table 5).

    scale: s of Eq. 16 (diffusers convention; 0 disables). layers: self-attention layer path(s) or
    pattern(s) whose map gives the mask (None: the model's default, the mid block's first
    self-attention). threshold: psi of Eq. 14, > 0 (1.0 = the mean of the map). blur_kernel_size,
    blur_sigma: the Gaussian blur (diffusers: 9 and 1.0). mask: "attention" (SAG), "global" (blur
    guidance), or the Table 5 ablations "random", "square", "highfreq" that mask ``mask_fraction`` of
    the pixels. window: (start, stop) fractions of the sampling steps where the term is applied; outside
    it the extra model pass is skipped. blur: another blur strategy (a function of x0_hat, e.g.
    :func:`attnguide.engine.degrade.mean_pixel_blur`) in place of the Gaussian; None keeps the Gaussian.
    """

    scale: float = 0.75
    layers: str | Sequence[str] | None = None
    threshold: float = 1.0
    blur_kernel_size: int = 9
    blur_sigma: float = 1.0
    mask: str = "attention"
    mask_fraction: float = 0.4
    window: tuple[float, float] = (0.0, 1.0)
    blur: Blur | None = None

    def __post_init__(self) -> None:
        check_scale("sag_scale", self.scale, minimum=-math.inf)
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
        object.__setattr__(self, "window", check_window("sag_window", self.window))
        if self.blur is not None and not callable(self.blur):
            raise ValueError(f"`sag_blur` must be a function of a (B, C, H, W) tensor, got {self.blur!r}")

    @property
    def needs_map(self) -> bool:
        return self.mask == "attention"


@dataclass(frozen=True)
class PAG:
    """Perturbed-Attention Guidance (Ahn et al., arXiv:2403.17377): identity self-attention in ``layers``
    for the perturbed pass.

    scale: s_pag (diffusers' pag_scale). adaptive_scale: a, giving s_t = max(0, s - a (1000 - t)) as in
    diffusers. layers: paths or patterns; None: the model's default as diffusers chooses it (UNets: the
    mid block, "mid"; transformers: "blocks.1"; spatial layers only). window: as for :class:`SAG`.
    """

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: str | Sequence[str] | None = None
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_scale("pag_scale", self.scale, minimum=-math.inf)
        check_scale("pag_adaptive_scale", self.adaptive_scale)
        check_layers("pag_applied_layers", self.layers)
        object.__setattr__(self, "window", check_window("pag_window", self.window))

    def scale_at(self, t: Tensor | float) -> float:
        """s_t, diffusers' adaptive PAG scale."""
        if self.adaptive_scale > 0 and self.scale > 0:
            return max(0.0, self.scale - self.adaptive_scale * (1000 - float(t)))
        return self.scale


def in_window(window: tuple[float, float], step: int, num_steps: int) -> bool:
    """Whether sampling step ``step`` (0-based, of ``num_steps``) falls inside a (start, stop) window."""
    if window == (0.0, 1.0):
        return True
    frac = step / max(1, num_steps)
    return window[0] <= frac < window[1]


def cfg(out_cond: Tensor, out_uncond: Tensor | None, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: u + w (c - u); the conditional output alone without an unconditional one."""
    if out_uncond is None:
        return out_cond
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def rescale_cfg(guided: Tensor, out_cond: Tensor, guidance_rescale: float) -> Tensor:
    """CFG rescale (Lin et al. 2023, Sec. 3.4), as diffusers' ``rescale_noise_cfg``."""
    std_cond = out_cond.std(dim=list(range(1, out_cond.ndim)), keepdim=True)
    std_cfg = guided.std(dim=list(range(1, guided.ndim)), keepdim=True)
    rescaled = guided * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def combine(
    out_cond: Tensor,
    *,
    out_uncond: Tensor | None = None,
    guidance_scale: float = 1.0,
    sag_ref: Tensor | None = None,
    out_degraded: Tensor | None = None,
    sag_scale: float = 0.0,
    out_perturbed: Tensor | None = None,
    pag_scale: float = 0.0,
) -> Tensor:
    """The guided prediction: CFG, then the SAG term s_sag (ref - degraded), then the PAG term
    s_pag (c - perturbed); each term only where its weak prediction is given."""
    out = cfg(out_cond, out_uncond, guidance_scale)
    if out_degraded is not None:
        out = out + sag_scale * (sag_ref - out_degraded)
    if out_perturbed is not None:
        out = out + pag_scale * (out_cond - out_perturbed)
    return out


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


__all__ = [
    "PAG",
    "SAG",
    "cfg",
    "check_scale",
    "combine",
    "in_window",
    "rescale_cfg",
    "sag_degraded_input",
]
