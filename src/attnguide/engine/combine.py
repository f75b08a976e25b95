"""Classifier-free guidance: the combine rule the guided step is given, and its rescale.

CFG (Ho & Salimans 2022, arXiv:2207.12598, Eq. 6):   out = u + w (c - u)               [w = guidance_scale]
CFG rescale (Lin et al. 2023, arXiv:2305.08891, Sec. 3.4): the guided prediction's std matched to c's.

Every guidance term adds its own share to the combined prediction (engine/terms/: SAG's s (u - u_sag) or
s (c - c_sag), a perturbation's s (c - weak), classifier guidance's shift), so that

    out = u + w (c - u) + sum over the terms of their deltas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

__all__ = ["cfg", "combine", "rescale_cfg"]


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
    out_uncond: Tensor | None = None,
    guidance_scale: float = 1.0,
    deltas: Mapping[str, Tensor] | Iterable[Tensor] = (),
) -> Tensor:
    """The guided prediction: CFG (:func:`cfg`), then each term's delta, in order."""
    out = cfg(out_cond, out_uncond, guidance_scale)
    for delta in deltas.values() if isinstance(deltas, Mapping) else deltas:
        out = out + delta
    return out
