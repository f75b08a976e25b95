"""Token Perturbation Guidance (Rajabi et al. 2025, arXiv:2506.10036).

The weak prediction runs the conditional branch with the tokens entering the chosen blocks shuffled,
h -> P h with one random permutation P of the token axis per block and pass (norm-preserving: each token
keeps its features, only their order changes), the rest of the network run on the shuffled tokens:

    out += s (c - model_{h -> P h}(x_t))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_blocks
from ..layers import default_pag_layers, resolve_blocks, transformer_blocks
from .base import AppSpec, Term, scale_param

__all__ = ["TPG"]

Blocks = int | str | list[int | str] | None


@dataclass(frozen=True)
class TPG(Term):
    """Token Perturbation Guidance (Rajabi et al., arXiv:2506.10036): the weak pass shuffles the tokens
    entering the transformer blocks ``layers`` (one random permutation of the token axis per block and
    step: norm-preserving) and runs the rest of the network on them; out += s (c - c_tpg).

    scale: s (default 3.0). layers: transformer blocks by index (``transformer_blocks.i``), path or
    pattern (None: the blocks holding PAG's default layers). window: as for :class:`SAG`. The
    permutations come from the run's generator (the Guider's ``generator``).
    """

    name: ClassVar[str] = "tpg"
    title: ClassVar[str] = "TPG"
    paper: ClassVar[str] = "arXiv:2506.10036"
    graph_safe: ClassVar[bool] = False  # a replayed graph would reuse one permutation
    block_hook: ClassVar[str] = "before"
    app: ClassVar[AppSpec] = AppSpec(
        params=(
            scale_param(
                "tpg", "TPG", 0.2, why="0.5 already breaks the bundled model's samples (50 DDIM steps)"
            ),
        ),
        eval_scale=1.0,
        weak="the tokens entering the blocks of PAG's default layers shuffled by one random permutation "
        "(norm-preserving)",
    )

    scale: float = 3.0
    layers: Blocks = None
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        check_blocks("tpg_layers", self.layers)

    def blocks(self, model: nn.Module) -> list[str]:
        layers = self.layers
        if layers is None:  # the blocks that hold PAG's default layers
            blocks = list(transformer_blocks(model))
            parents = {name.rsplit(".", 1)[0] for name in default_pag_layers(model)}
            layers = [b for b in blocks if b in parents] or [blocks[len(blocks) // 2]]
        return resolve_blocks(model, layers, argument="tpg_layers")

    def before_block(self, tokens: Tensor, generator: Any) -> Tensor:
        perm = torch.randperm(tokens.shape[1], generator=generator).to(tokens.device)
        return tokens[:, perm]
