"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024, arXiv:2403.17377).

The weak prediction runs the conditional branch with the self-attention map of the chosen layers
replaced by the identity matrix, so each token's output is its own value (paper Eq. 9, A = I):

    out += s_t (c - model_{A = I}(x_t)),     s_t = max(0, s - a (1000 - t))   (diffusers' adaptive scale)

In joint text + image attention (SD3, Flux) diffusers' rule: among the image keys each image query
attends only to itself, the text keys stay visible, the text queries attend as usual. In Sana's linear
attention the output is the projected V (diffusers' ``PAGIdentitySanaLinearAttnProcessor2_0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_layers, check_scale
from ..layers import default_pag_layers, resolve_layers
from .base import AppSpec, AttentionCall, Term, keyword, scale_param

__all__ = ["PAG", "identity_attention"]


def identity_attention(
    q: Tensor, k: Tensor, v: Tensor, image: slice | int, options: dict | None = None
) -> Tensor:
    """PAG's perturbed attention on (B, heads, N, d) tensors: the identity matrix, i.e. V, for
    self-attention (``image`` covers all N tokens); in joint attention (``image``: where the image tokens
    sit; an int n means the first n), diffusers' rule for SD3 (``PAGJointAttnProcessor2_0``), also used
    for Flux: among the image keys each image query attends only to itself, the text keys stay visible
    to it, and the text queries attend as usual."""
    n = q.shape[-2]
    image = slice(0, image) if isinstance(image, int) else image
    start, stop, _ = image.indices(n)
    if stop - start == n:
        return v
    mask = torch.zeros((n, n), device=q.device, dtype=q.dtype)
    mask[image, image] = -torch.inf
    mask[image, image].fill_diagonal_(0)
    options = {key: val for key, val in (options or {}).items() if key != "attn_mask"}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], **options)


@dataclass(frozen=True)
class PAG(Term):
    """Perturbed-Attention Guidance (Ahn et al., arXiv:2403.17377): identity self-attention in ``layers``
    for the perturbed pass.

    scale: s_pag (diffusers' pag_scale). adaptive_scale: a, giving s_t = max(0, s - a (1000 - t)) as in
    diffusers. layers: paths or patterns; None: the model's default as diffusers chooses it (UNets: the
    mid block, "mid"; transformers: "blocks.1"; spatial layers only). window: as for :class:`SAG`.
    """

    name: ClassVar[str] = "pag"
    title: ClassVar[str] = "PAG"
    default_on_in_pipelines: ClassVar[bool] = True
    paper: ClassVar[str] = "arXiv:2403.17377"
    app: ClassVar[AppSpec] = AppSpec(
        params=(scale_param("pag", "PAG", 1.0, why="the evaluation's scale on the bundled model"),),
        weak="identity self-attention (output V) in the chosen layers (UNets: the mid block)",
    )

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: str | Sequence[str] | None = keyword("pag_applied_layers", default=None)
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        check_scale("pag_adaptive_scale", self.adaptive_scale)
        check_layers("pag_applied_layers", self.layers)

    def scale_at(self, t: Tensor | float) -> float:
        """s_t, diffusers' adaptive PAG scale."""
        if self.adaptive_scale > 0 and self.scale > 0:
            return max(0.0, self.scale - self.adaptive_scale * (1000 - float(t)))
        return self.scale

    def attention_layers(self, model: nn.Module) -> list[str]:
        names = self.layers if self.layers is not None else default_pag_layers(model)
        return resolve_layers(model, names, argument="pag_applied_layers")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        return identity_attention(q, k, v, call.image, call.options)

    def attend_linear(self, attn: Any, x: Tensor, layer: str) -> Tensor:
        return attn.to_out[1](attn.to_out[0](attn.to_v(x).to(x.dtype)))
