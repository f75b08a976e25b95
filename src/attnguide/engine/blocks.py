"""Guidance terms that act on whole transformer blocks rather than inside one attention call.

* TPG (Token Perturbation Guidance, arXiv:2506.10036): the weak pass shuffles the tokens entering the
  chosen blocks, h -> P h with one random permutation P of the token axis (norm-preserving: each token
  keeps its features, only their order changes), and lets the rest of the network run on the shuffled
  tokens.
* SLG (skip-layer guidance, Stable Diffusion 3.5): the weak pass skips the chosen blocks, each block's
  output being its input (diffusers' ``SD3Transformer2DModel(skip_layers=...)``).

Both act only on the rows of their own branch in a batched model call (``GuidanceState.groups``), through
forward hooks that :class:`BlockHooks` registers for a guided run and always removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .attention import GuidanceState, bounded_pattern, spatial_layers

#: Blocks whose forward returns (encoder_hidden_states, hidden_states) instead of hidden_states.
PAIR_OUTPUT_BLOCKS = frozenset(
    {"JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"}
)


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks that hold the model's spatial self-attention layers (the parent of each layer:
    ``transformer_blocks.7`` of ``transformer_blocks.7.attn``), by module path, in model order; where the
    parent is a plain list of layers (pixel ``UNet2DModel``: ``mid_block.attentions.0`` is a whole
    residual attention block), the layer itself."""
    modules = dict(model.named_modules())
    names = []
    for layer in spatial_layers(model):
        parent = layer.rsplit(".", 1)[0] if "." in layer else ""
        block = modules.get(parent)
        names.append(layer if block is None or isinstance(block, (nn.ModuleList, nn.ModuleDict)) else parent)
    return {name: modules[name] for name in dict.fromkeys(names)}


def resolve_blocks(model: nn.Module, layers: Sequence[int | str], *, argument: str) -> list[str]:
    """Module paths of the blocks chosen by ``layers``: ints index the model's ``transformer_blocks``
    (diffusers' SD3 ``skip_guidance_layers`` convention: 7 is ``transformer_blocks.7``); strings are exact
    block paths or patterns as for attention layers (a number never matches the start of a longer one).
    ValueError listing the blocks there are where something matches nothing."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"`{argument}`: {type(model).__name__} has no transformer block with self-attention")
    if isinstance(layers, (int, str)):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError(f"`{argument}` is empty; name at least one transformer block")
    chosen: set[str] = set()
    listing = "\n  ".join(blocks)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)) or layer == "":
            raise ValueError(f"`{argument}` must hold block indices or block paths, got {layer!r}")
        if isinstance(layer, int):
            hits = [n for n in blocks if n == f"transformer_blocks.{layer}"]
        elif layer in blocks:
            hits = [layer]
        else:
            rx = bounded_pattern(layer)
            hits = [n for n in blocks if rx.search(n)]
        if not hits:
            raise ValueError(
                f"`{argument}`: {layer!r} matches no transformer block of {type(model).__name__}. "
                f"Available blocks:\n  {listing}"
            )
        chosen.update(hits)
    return [n for n in blocks if n in chosen]


def _input(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


class BlockHooks:
    """Forward hooks on transformer blocks for TPG (shuffle the tokens entering the block) and SLG (the
    block's output is its input), each on the rows of its own branch only; a context manager that
    always removes them. ``generator`` draws TPG's permutations (one per block and pass)."""

    def __init__(self, model: nn.Module, state: GuidanceState, generator: torch.Generator):
        self.model, self.state, self.generator = model, state, generator
        self._modules = dict(model.named_modules())
        self._handles: list[Any] = []

    def install(self, tpg_blocks: Sequence[str], slg_blocks: Sequence[str]) -> None:
        for name in tpg_blocks:
            h = self._modules[name].register_forward_pre_hook(self._shuffle, with_kwargs=True)
            self._handles.append(h)
        for name in slg_blocks:
            block = self._modules[name]
            h = block.register_forward_hook(self._skip, with_kwargs=True)
            self._handles.append(h)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> BlockHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _rows(self, term: str, batch: int) -> slice | None:
        st = self.state
        span = st.groups.get(term)
        if span is None or not st.this_thread():
            return None
        return slice(st.layer_rows(span[0], batch), st.layer_rows(span[1], batch))

    def _shuffle(self, module: nn.Module, args: tuple, kwargs: dict):
        x = _input(args, kwargs, "hidden_states", 0)
        rows = self._rows("tpg", x.shape[0]) if isinstance(x, Tensor) and x.ndim in (3, 4) else None
        if rows is None:
            return None
        tokens = x if x.ndim == 3 else x.flatten(2).transpose(1, 2)  # a feature map's pixels are its tokens
        perm = torch.randperm(tokens.shape[1], generator=self.generator).to(x.device)
        shuffled = tokens.clone()
        shuffled[rows] = tokens[rows][:, perm]
        if x.ndim == 4:
            shuffled = shuffled.transpose(1, 2).reshape(x.shape)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": shuffled}
        return (shuffled, *args[1:]), kwargs

    def _skip(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        x = _input(args, kwargs, "hidden_states", 0)
        rows = self._rows("slg", x.shape[0]) if isinstance(x, Tensor) else None
        if rows is None:
            return None
        if type(module).__name__ not in PAIR_OUTPUT_BLOCKS:
            out = output.clone()
            out[rows] = x[rows]
            return out
        enc_in = _input(args, kwargs, "encoder_hidden_states", 1)
        enc_out, hid_out = output
        hid_out = hid_out.clone()
        hid_out[rows] = x[rows]
        if enc_out is not None and isinstance(enc_in, Tensor):
            enc_out = enc_out.clone()
            enc_out[rows] = enc_in[rows]
        return enc_out, hid_out
