"""Layer selection, shared by the terms that act inside attention (SAG, PAG, SEG) and the terms that act
on whole blocks (TPG, SLG).

* :func:`resolve_layers` chooses self-attention layers by exact module path or by a pattern that matches
  on number boundaries ("blocks.1" matches "blocks.1.attn1", not "blocks.10.attn1");
  :func:`resolve_blocks` chooses the blocks that hold them, by index or the same patterns.
* :func:`default_sag_layer`, :func:`default_pag_layers` and :func:`middle_block` are the per-family
  defaults the terms start from (spatial layers only: temporal layers are chosen by name, never by
  default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

__all__ = [
    "TEMPORAL_LAYER",
    "bounded_pattern",
    "cross_attention_layers",
    "default_pag_layers",
    "default_sag_layer",
    "middle_block",
    "resolve_blocks",
    "resolve_layers",
    "self_attention_layers",
    "spatial_layers",
    "transformer_blocks",
]


def self_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every self-attention (or joint text + image attention) module of ``model`` by its module path, in
    model order: diffusers' ``Attention`` and the newer per-family attention classes (``FluxAttention``
    ...), which share ``AttentionModuleMixin``; cross-attention layers are left out."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (Attention, AttentionModuleMixin)) and not getattr(m, "is_cross_attention", False)
    }


def cross_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every cross-attention module of ``model`` (its keys and values come from another sequence: the
    text), by module path, in model order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (Attention, AttentionModuleMixin)) and getattr(m, "is_cross_attention", False)
    }


def _literal_dots(pattern: str) -> str:
    """Escape each bare "." that is not quantified: in module paths a dot means a dot ("blocks.1." must
    not match "blocks.10"), while ".*", ".+" and ".?" keep their regex meaning."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch == "[":
            in_class = True
        elif ch == "]":
            in_class = False
        elif ch == "." and not in_class and pattern[i + 1 : i + 2] not in ("*", "+", "?", "{"):
            ch = "\\."
        out.append(ch)
        i += 1
    return "".join(out)


def bounded_pattern(pattern: str) -> re.Pattern:
    """``pattern`` compiled for module paths (see :func:`resolve_layers`)."""
    # A number at either end of a match must not continue in the name: "blocks.1" must not match inside
    # "blocks.10". The assertion "(?!(?<=\d)\d)" fails only between two digits.
    return re.compile(r"(?!(?<=\d)\d)(?:" + _literal_dots(pattern) + r")(?!(?<=\d)\d)")


def resolve_layers(
    model: nn.Module, patterns: str | Sequence[str], *, argument: str = "layers", kind: str = "self"
) -> list[str]:
    """Module paths of the self-attention layers (``kind="cross"``: cross-attention layers) chosen by
    ``patterns``.

    Each pattern is an exact module path, a parent path ("mid_block.attentions.0"), or a regular
    expression searched in the module paths (diffusers' PAG convention: "mid", "down", "up",
    "blocks.1", "blocks.(1|2)"), with two differences that only remove spurious matches: a number in the
    pattern never matches the start of a longer number, and a bare "." means a literal dot (".*",
    ".+", ".?" stay wildcards). A pattern that matches nothing raises ValueError listing the layers there are.
    """
    layers = self_attention_layers(model) if kind == "self" else cross_attention_layers(model)
    if not layers:
        why = "by SAG or PAG" if kind == "self" else f"by `{argument.split('_')[0]}`"
        what = f"{type(model).__name__} has no {kind}-attention layer"
        raise ValueError(f"`{argument}`: {what}, so it cannot be guided {why}")
    if isinstance(patterns, str):
        patterns = [patterns]
    if len(patterns) == 0:
        raise ValueError(f"`{argument}` is empty; name at least one self-attention layer")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"`{argument}` must hold non-empty strings, got {pattern!r}")
        if pattern in layers:
            chosen.add(pattern)
            continue
        try:
            rx = bounded_pattern(pattern)
        except re.error as err:
            raise ValueError(f"`{argument}`: {pattern!r} is not a valid pattern ({err})") from None
        hits = [name for name in layers if name.startswith(pattern + ".") or rx.search(name)]
        if not hits:
            listing = "\n  ".join(layers)
            raise ValueError(
                f"`{argument}`: {pattern!r} matches no {kind}-attention layer of {type(model).__name__}. "
                f"Available {kind}-attention layers:\n  {listing}"
            )
        chosen.update(hits)
    return [name for name in layers if name in chosen]


#: Layers that attend across frames (video motion modules, spatio-temporal blocks): selectable by name,
#: never chosen by default.
TEMPORAL_LAYER = re.compile(r"motion_modules|temporal|temp_attention")


def spatial_layers(model: nn.Module) -> list[str]:
    """The self-attention layers of ``model`` that attend over image positions (not over frames)."""
    layers = self_attention_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no self-attention layer, so it cannot be guided by SAG or PAG"
        )
    return [name for name in layers if not TEMPORAL_LAYER.search(name)] or list(layers)


_LIST_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def middle_layer(layers: list[str]) -> str:
    """The middle of ``layers`` (module paths in model order), taken in the model's trunk: the longest
    list of numbered blocks (``layers.0`` ... ``layers.25``), where the model also has shorter lists
    (Lumina2's ``noise_refiner`` and ``context_refiner``, whose caption refiner never sees the image);
    where the longest lists tie, the middle of all."""
    owner = {name: m.groups() for name in layers if (m := _LIST_INDEX.match(name))}
    lists: dict[str, set[str]] = {}
    for parent, index in owner.values():
        lists.setdefault(parent, set()).add(index)
    ranked = sorted(lists, key=lambda k: len(lists[k]), reverse=True)
    if len(ranked) > 1 and len(lists[ranked[0]]) > len(lists[ranked[1]]):
        layers = [n for n in layers if n in owner and owner[n][0] == ranked[0]]
    return layers[len(layers) // 2]


def default_sag_layer(model: nn.Module) -> str:
    """The SAG layer used when none is named: the first spatial self-attention of the mid block
    (diffusers' choice for Stable Diffusion), else the middle spatial self-attention layer of the model
    (a transformer's middle block)."""
    layers = spatial_layers(model)
    for name in layers:
        if name.startswith("mid_block."):
            return name
    return middle_layer(layers)


#: Where diffusers' PAG pipeline of a model family chooses other default layers than the rules below, and
#: Flux (no diffusers PAG): SD3's choice, the second double-stream block ("blocks.1" alone would also
#: pick single_transformer_blocks.1).
PAG_DEFAULTS_BY_MODEL = {
    "SanaTransformer2DModel": "transformer_blocks.0",
    "FluxTransformer2DModel": "transformer_blocks.1.attn",
}


def default_pag_layers(model: nn.Module) -> list[str]:
    """The PAG layers used when none are named, as diffusers' PAG pipelines choose them: the spatial
    self-attention of the mid block in UNets ("mid"), the first-but-one transformer block in
    transformers ("blocks.1": DiT, PixArt, HunyuanDiT, SD3); else the middle spatial self-attention (a UNet
    without a mid block, as the SD latent upscaler's)."""
    layers = spatial_layers(model)
    family = PAG_DEFAULTS_BY_MODEL.get(type(model).__name__)
    if family is not None:
        return resolve_layers(model, family, argument="pag_applied_layers")
    mid = [name for name in layers if name.startswith("mid_block.")]
    if mid:
        return mid
    rx = bounded_pattern(r"blocks.1")
    hits = [name for name in layers if rx.search(name)]
    return hits or [middle_layer(layers)]


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


def middle_block(model: nn.Module) -> list[str]:
    """The mid block's transformer blocks (UNets), else the model's middle transformer block."""
    blocks = list(transformer_blocks(model))
    mid = [b for b in blocks if b.startswith("mid_block.")]
    return mid or [middle_layer(blocks)]


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
