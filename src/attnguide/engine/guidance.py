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
    SEG   (Hong 2024, arXiv:2408.00760): out += s_seg (c - model_blurred_queries(x_t))
    TPG   (Rajabi et al. 2025, arXiv:2506.10036): out += s_tpg (c - model_shuffled_tokens(x_t))
    SLG   (skip-layer guidance, SD3.5):  out += s_slg (c - model_without_blocks(x_t))

where x_tilde_t comes from :func:`sag_degraded_input` (Alg. 1 / Eq. 13-15):

    x0_hat   = (x_t - b eps) / a,    a = sqrt(abar), b = sqrt(1 - abar)              (Eq. 2)
    x0_tilde = M * Blur(x0_hat) + (1 - M) * x0_hat                                   (Eq. 15, M from Eq. 14)
    x_tilde  = a x0_tilde + b eps                                                    (re-noise, same eps)

with x_t = a x0 + b eps the step's noise parameterisation (engine/parameterization.py: variance
preserving and sigma schedules; eps / v / x0 outputs converted there). Only the latent channels are
degraded, frame by frame for video; conditioning channels of the input stay (engine/layout.py).

Eq. 15 written on x0 (blur x0_hat under the mask, then re-noise) equals the paper's form on x_t
(mix x_t and the re-noised blur with M), because re-noising is affine with the same eps.

The perturbation terms PAG, SEG, TPG and SLG each run the conditional branch once more with the model
weakened inside (engine/attention.py: identity attention, blurred queries; engine/blocks.py: shuffled
tokens, skipped blocks), batched with the CFG branches in one model call, and add s (c - weak).

Classifier guidance (CG; Dhariwal & Nichol 2021, arXiv:2105.05233, and the SAG paper's Eq. 3 and
Table 3) is not "prediction minus a weaker prediction" but a shift of the implied eps by a noise-aware
classifier's gradient at the model input x_t (see :class:`ClassifierGuidance` and
:func:`classifier_shift`):

    CG    (ADM's condition_score):       eps_hat = eps - b s_cg grad_{x_t} log p(y | x_t)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import check_blocks, check_layers, check_number, check_scale, check_window
from .degrade import MASK_KINDS, Blur, gaussian_blur_2d
from .parameterization import PREDICTION_TYPES, NoiseLevel, predict_eps, predict_x0, renoise


@dataclass(frozen=True)
class SAG:
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
        """Whether the SAG layer's map is captured: the attention mask's source, and the token grid of the
        "random_tokens" mask (which uses only the grid)."""
        return self.mask in ("attention", "random_tokens")


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


Layers = str | Sequence[str] | None
Blocks = int | str | Sequence[int | str] | None


@dataclass(frozen=True)
class SEG:
    """Smoothed Energy Guidance (Hong, arXiv:2408.00760): the weak pass blurs the self-attention queries
    of ``layers`` over the token grid with a Gaussian of ``sigma`` tokens (infinity: every query is the
    mean query, a uniform attention map), which smooths the attention's energy landscape; one extra
    conditional pass, out += s (c - c_seg).

    scale: s (SEG-SDXL's seg_scale, default 3.0). sigma: the blur (> 0; ``math.inf`` the limit;
    default ``math.inf``, the setting diffusers' guider means). layers: attention layers as for PAG
    (None: PAG's default, the mid block in UNets). window: as for :class:`SAG`. Not defined for linear
    attention (Sana): there it raises ValueError.
    """

    scale: float = 3.0
    sigma: float = math.inf
    layers: Layers = None
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_scale("seg_scale", self.scale, minimum=-math.inf)
        if not isinstance(self.sigma, (int, float)) or isinstance(self.sigma, bool) or not self.sigma > 0:
            raise ValueError(f"`seg_sigma` must be a number > 0 (math.inf allowed), got {self.sigma!r}")
        check_layers("seg_layers", self.layers)
        object.__setattr__(self, "window", check_window("seg_window", self.window))


@dataclass(frozen=True)
class TPG:
    """Token Perturbation Guidance (Rajabi et al., arXiv:2506.10036): the weak pass shuffles the tokens
    entering the transformer blocks ``layers`` (one random permutation of the token axis per block and
    step: norm-preserving) and runs the rest of the network on them; out += s (c - c_tpg).

    scale: s (default 3.0). layers: transformer blocks by index (``transformer_blocks.i``), path or
    pattern (None: the blocks holding PAG's default layers). window: as for :class:`SAG`. The
    permutations come from the run's generator (the Guider's ``generator``).
    """

    scale: float = 3.0
    layers: Blocks = None
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_scale("tpg_scale", self.scale, minimum=-math.inf)
        check_blocks("tpg_layers", self.layers)
        object.__setattr__(self, "window", check_window("tpg_window", self.window))


@dataclass(frozen=True)
class SLG:
    """Skip-layer guidance (Stable Diffusion 3.5; diffusers' SD3 ``skip_guidance_layers``): the weak pass
    skips the transformer blocks ``layers`` (each one's output is its input); out += s (c - c_slg).

    scale: s (diffusers' skip_layer_guidance_scale, 2.8). layers: block indices / paths / patterns
    (None: diffusers' recommended 7, 8, 9 where the model has those blocks, else its middle block).
    window: diffusers' (skip_layer_guidance_start, skip_layer_guidance_stop) = (0.01, 0.2); diffusers
    applies it where start * N < i < stop * N, attnguide where start * N <= i < stop * N (the same steps
    unless start * N is a whole number).
    """

    scale: float = 2.8
    layers: Blocks = None
    window: tuple[float, float] = (0.01, 0.2)

    def __post_init__(self) -> None:
        check_scale("slg_scale", self.scale, minimum=-math.inf)
        check_blocks("slg_layers", self.layers)
        object.__setattr__(self, "window", check_window("slg_window", self.window))


#: The perturbation terms beside PAG, by the name their branch has in the model batch.
PERTURBATION_TERMS = {"seg": SEG, "tpg": TPG, "slg": SLG}


#: A classifier-guidance gradient: ``grad_fn(x, t) -> grad_x log p(y | x_t)``, shaped like ``x``.
GradFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol, arXiv:2105.05233, Sec. 4 and Alg. 2; the SAG paper's
    Eq. 3 and Table 3): the implied eps is shifted along a noise-aware classifier's gradient,
    eps_hat = eps - sqrt(1 - abar_t) s grad_{x_t} log p(y | x_t) (:func:`classifier_shift`, which writes
    the same shift for every prediction type).

    scale: s, ADM's ``classifier_scale`` (0 disables; negative steers away from y). grad_fn: the
    gradient, as guided-diffusion's ``cond_fn(x, t)`` without its scale: ``x`` is the step's model input
    (latent channels; a leaf tensor the engine detached, so the function may call
    ``x.requires_grad_()``), ``t`` the timestep once per row (a 1-D tensor); it returns
    grad_x log p(y | x_t), shaped like ``x``. The labels y are the function's own (close over them:
    :func:`classifier_grad_fn` builds one from a classifier module). It runs under
    ``torch.enable_grad()`` and never sees the denoiser's graph. window: as for :class:`SAG`.
    """

    scale: float
    grad_fn: GradFn
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_scale("classifier_scale", self.scale, minimum=-math.inf)
        if not callable(self.grad_fn):
            raise ValueError(
                "`classifier` must be a function grad_fn(x, t) -> grad_x log p(y | x_t) (or a classifier "
                f"module where a pipeline takes one), got {self.grad_fn!r}"
            )
        object.__setattr__(self, "window", check_window("classifier_window", self.window))


def classifier_grad_fn(classifier: nn.Module, labels: Tensor) -> GradFn:
    """ADM's ``cond_fn`` (guided-diffusion ``scripts/classifier_sample.py``) for a noise-aware
    ``classifier(x, t) -> logits``: grad_x of log softmax(logits)[y], y = ``labels`` (one per row), per
    sample (the rows' log-probabilities are summed, so each row's gradient is its own as long as the
    classifier treats rows independently: eval mode for batch norm). No gradient reaches the
    classifier's weights."""
    if not isinstance(classifier, nn.Module):
        raise ValueError(
            f"`classifier` must be a torch.nn.Module classifier(x, t) -> logits, got {classifier!r}"
        )
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"`labels` must be a 1-D integer tensor (one label per image), got {labels!r}")

    def grad_fn(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"`labels`: {labels.shape[0]} labels for a batch of {x.shape[0]} images")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t).float(), dim=-1)
            rows = torch.arange(len(labels), device=log_probs.device)
            picked = log_probs[rows, labels.to(log_probs.device)]
            (grad,) = torch.autograd.grad(picked.sum(), x_in)
        return grad

    return grad_fn


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


def sag_update(sag_ref: Tensor, out_degraded: Tensor, sag_scale: float) -> Tensor:
    """SAG's term (Eq. 16): s_sag (ref - degraded), what SAG adds to the prediction."""
    return sag_scale * (sag_ref - out_degraded)


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
    classifier_shift: Tensor | None = None,
    weak: dict[str, tuple[Tensor, float]] | None = None,
) -> Tensor:
    """The guided prediction: CFG, then the SAG term s_sag (ref - degraded), then the PAG term
    s_pag (c - perturbed), then each other perturbation term s (c - weak) (``weak``: SEG, TPG, SLG by
    name: (weak prediction, scale)), then classifier guidance's shift (:func:`classifier_shift`, already
    in the prediction's type); each term only where its weak prediction (or shift) is given."""
    out = cfg(out_cond, out_uncond, guidance_scale)
    if out_degraded is not None:
        out = out + sag_update(sag_ref, out_degraded, sag_scale)
    if out_perturbed is not None:
        out = out + pag_scale * (out_cond - out_perturbed)
    for weak_out, scale in (weak or {}).values():
        out = out + scale * (out_cond - weak_out)
    if classifier_shift is not None:
        out = out + classifier_shift
    return out


def classifier_shift(grad: Tensor, level: NoiseLevel, prediction_type: str, scale: float) -> Tensor:
    """What classifier guidance adds to the model output: ADM's score form (guided-diffusion
    ``condition_score``) eps_hat = eps - b s g, g = ``grad`` = grad_{x_t} log p(y | x_t) at the model
    input x_t = a x0 + b eps (``level``; b = sqrt(1 - abar_t), so it works with any scheduler, DDIM
    included), written for each prediction type.

    Why the score form: grad log p(x_t) = -eps / b, so adding s g to the score is eps -> eps - b s g.
    Shift eps by delta = -b s g with x_t fixed; then x0 = (x_t - b eps) / a moves by -(b / a) delta, and
    (engine/parameterization.py) the outputs move by:

        epsilon:       eps_hat = eps + delta                            = eps - b s g
        v_prediction:  v = a eps - b x0  ->  a delta + (b^2 / a) delta  = v - (b / a) s g   (a^2 + b^2 = 1)
        sample:        x0_hat = x0 - (b / a) delta                      = x0 + (b^2 / a) s g
        flow:          v = eps - x0      ->  delta + (b / a) delta      = v - (b / a) s g   (a + b = 1)

    so ``predict_eps`` of the shifted output is eps - b s g and its ``predict_x0`` is x0 + (b^2 / a) s g
    in every type. Where a = 0 (pure noise: x_t says nothing of x0, so an ideal classifier's gradient
    is 0, and the eps shift has no finite v / x0 form) the v, x0 and flow shifts are 0: the term skips
    that step. In a DDPM step (fixed small variance Sigma) this moves the posterior mean by
    (beta_t / sqrt(alpha_t)) s g, ADM's ``condition_mean`` (mean + s Sigma g) times
    (1 - abar_t) / ((1 - abar_{t-1}) sqrt(alpha_t)): near 1 for fine steps away from t = 0.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    a, b = level.on(grad, cast=True)
    if prediction_type == "epsilon":
        return (scale * -b) * grad
    informative = a > 0  # a = 0: pure noise (flow matching's first step, zero terminal SNR)
    safe_a = torch.where(informative, a, torch.ones_like(a))
    factor = b * b / safe_a if prediction_type == "sample" else -b / safe_a  # v_prediction, flow: -b / a
    return (scale * torch.where(informative, factor, torch.zeros_like(factor))) * grad


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
    "ClassifierGuidance",
    "GradFn",
    "cfg",
    "check_scale",
    "classifier_grad_fn",
    "classifier_shift",
    "combine",
    "in_window",
    "rescale_cfg",
    "sag_degraded_input",
]
