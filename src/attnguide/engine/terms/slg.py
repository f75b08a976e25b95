"""Skip-layer guidance (Stable Diffusion 3.5; diffusers' SD3 ``skip_guidance_layers``).

The weak prediction runs the conditional branch with the chosen blocks skipped, each block's output
being its input:

    out += s (c - model_{block(h) -> h}(x_t)),   in a window of the steps (SD3.5: 1 % to 20 %)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..checks import check_blocks
from ..layers import middle_block, resolve_blocks, transformer_blocks
from .base import AppParam, AppSpec, Term, scale_param

__all__ = ["SLG"]

Blocks = int | str | list[int | str] | None


@dataclass(frozen=True)
class SLG(Term):
    """Skip-layer guidance (Stable Diffusion 3.5; diffusers' SD3 ``skip_guidance_layers``): the weak pass
    skips the transformer blocks ``layers`` (each one's output is its input); out += s (c - c_slg).

    scale: s (diffusers' skip_layer_guidance_scale, 2.8). layers: block indices / paths / patterns
    (None: diffusers' recommended 7, 8, 9 where the model has those blocks, else its middle block).
    window: diffusers' (skip_layer_guidance_start, skip_layer_guidance_stop) = (0.01, 0.2); diffusers
    applies it where start * N < i < stop * N, attnguide where start * N <= i < stop * N (the same steps
    unless start * N is a whole number).
    """

    name: ClassVar[str] = "slg"
    title: ClassVar[str] = "SLG"
    paper: ClassVar[str] = "Stable Diffusion 3.5"
    block_hook: ClassVar[str] = "after"
    app: ClassVar[AppSpec] = AppSpec(
        params=(
            scale_param("slg", "SLG", 1.0, why="the evaluation's scale on the bundled model (2.8: SD3.5's)"),
            AppParam("window", (0.01, 0.2), "window"),
        ),
        eval_scale=1.0,
        eval_options={"window": (0.0, 1.0)},
        passes="+1 row block, in its step window only",
        weak="blocks 7, 8, 9 where the model has them (else the mid block's) skipped: output = input",
    )

    scale: float = 2.8
    layers: Blocks = None
    window: tuple[float, float] = (0.01, 0.2)

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        check_blocks("slg_layers", self.layers)

    def blocks(self, model: nn.Module) -> list[str]:
        layers = self.layers
        if layers is None:  # diffusers' SD3.5 recommendation where the model has those blocks
            wanted = [f"transformer_blocks.{i}" for i in (7, 8, 9)]
            layers = wanted if all(w in transformer_blocks(model) for w in wanted) else middle_block(model)
        return resolve_blocks(model, layers, argument="slg_layers")

    def after_block(self, block_input: Tensor, block_output: Tensor) -> Tensor:
        return block_input
