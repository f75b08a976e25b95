"""Attention processors and layer selection.

* :class:`AttentionMapCapture` computes a self-attention layer as usual and records its aggregated map
  (mean over heads, sum over queries: SAG paper, arXiv:2210.00939, Eq. 13 before reshaping) for the
  guidance step.
* :class:`IdentityPerturbation` replaces a layer's attention by the identity for the trailing, perturbed
  rows of the batch (PAG, arXiv:2403.17377): output = to_out(to_v(x)).
* :func:`resolve_layers` chooses layers by exact module path or by a pattern that matches on number
  boundaries ("blocks.1" matches "blocks.1.attn1", not "blocks.10.attn1").
* :class:`ProcessorSwap` installs processors and always restores the originals.
"""

from __future__ import annotations

import inspect
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Size, Tensor, nn


@dataclass(frozen=True)
class MapLimits:
    """How a SAG map is computed. Above ``exact_max_elements`` attention probabilities (batch x heads x
    N x N) the map is computed in query chunks of about ``chunk_elements`` probabilities, beside a fused
    attention call, so the N x N matrix is never held whole (memory-flat); at or below it, exactly as
    diffusers' SAG pipeline does (bit-identical masks)."""

    exact_max_elements: int = 2**26
    chunk_elements: int = 2**24

    def __post_init__(self) -> None:
        for name in ("exact_max_elements", "chunk_elements"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "chunk_elements" else 0):
                raise ValueError(f"`{name}` must be a non-negative integer (chunk: positive), got {v!r}")


#: The default: exact maps up to 2^26 probabilities, then memory-flat in chunks of 2^24.
DEFAULT_MAP_LIMITS = MapLimits()


def self_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every self-attention module of ``model`` by its module path, in model order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Attention) and not getattr(m, "is_cross_attention", False)
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


def _bounded(pattern: str) -> re.Pattern:
    # A number at either end of a match must not continue in the name: "blocks.1" must not match inside
    # "blocks.10". The assertion "(?!(?<=\d)\d)" fails only between two digits.
    return re.compile(r"(?!(?<=\d)\d)(?:" + _literal_dots(pattern) + r")(?!(?<=\d)\d)")


def resolve_layers(model: nn.Module, patterns: str | Sequence[str], *, argument: str = "layers") -> list[str]:
    """Module paths of the self-attention layers chosen by ``patterns``.

    Each pattern is an exact module path, a parent path ("mid_block.attentions.0"), or a regular
    expression searched in the module paths (diffusers' PAG convention: "mid", "down", "up",
    "blocks.1", "blocks.(1|2)"), with two differences that only remove spurious matches: a number in the
    pattern never matches the start of a longer number, and a bare "." means a literal dot (".*",
    ".+", ".?" stay wildcards). A pattern that matches nothing raises ValueError listing the layers there are.
    """
    layers = self_attention_layers(model)
    if not layers:
        raise ValueError(
            f"`{argument}`: {type(model).__name__} has no self-attention layer, so it cannot be guided "
            "by SAG or PAG"
        )
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
            rx = _bounded(pattern)
        except re.error as err:
            raise ValueError(f"`{argument}`: {pattern!r} is not a valid pattern ({err})") from None
        hits = [name for name in layers if name.startswith(pattern + ".") or rx.search(name)]
        if not hits:
            listing = "\n  ".join(layers)
            raise ValueError(
                f"`{argument}`: {pattern!r} matches no self-attention layer of {type(model).__name__}. "
                f"Available self-attention layers:\n  {listing}"
            )
        chosen.update(hits)
    return [name for name in layers if name in chosen]


def default_sag_layer(model: nn.Module) -> str:
    """The SAG layer used when none is named: the first self-attention of the mid block (diffusers'
    choice for Stable Diffusion), else the middle self-attention layer of the model."""
    layers = list(self_attention_layers(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no self-attention layer, so it cannot be guided by SAG or PAG"
        )
    for name in layers:
        if name.startswith("mid_block."):
            return name
    return layers[len(layers) // 2]


@dataclass
class GuidanceState:
    """Mutable state shared by the installed processors and the sampling step.

    ``perturbed_rows``: how many trailing batch rows the PAG processors perturb in the next call (0: none).
    ``capture``: whether capture processors record their map in the next call; ``capture_rows``: how many
    leading batch rows need it (0: all); the memory-flat path computes only those.
    ``maps``: aggregated maps recorded by capture processors, per layer path: (rows, N) and the grid.
    """

    perturbed_rows: int = 0
    capture: bool = False
    capture_rows: int = 0
    maps: dict[str, tuple[Tensor, tuple[int, int] | None]] = field(default_factory=dict)


def aggregated_map_chunked(
    query: Tensor, key: Tensor, scale: float, chunk_elements: int = DEFAULT_MAP_LIMITS.chunk_elements
) -> Tensor:
    """Mean over heads of sum over queries of softmax(q k^T * scale), without the full N x N matrix.

    query, key: (B, heads, N, d). Returns (B, N) in float32. Rows are processed in chunks so that at most
    about ``chunk_elements`` probabilities exist at once.
    """
    b, h, n, _ = query.shape
    rows = max(1, chunk_elements // max(1, b * h * key.shape[2]))
    total = torch.zeros(b, h, key.shape[2], device=query.device, dtype=torch.float32)
    for start in range(0, n, rows):
        scores = (
            torch.matmul(query[:, :, start : start + rows].float(), key.float().transpose(-1, -2)) * scale
        )
        total += scores.softmax(dim=-1).sum(dim=2)
    return total.mean(dim=1)


class AttentionMapCapture:
    """Self-attention processor that also records the aggregated attention map of its layer.

    Up to ``limits.exact_max_elements`` (:class:`MapLimits`) it follows diffusers' ``AttnProcessor``
    (explicit probabilities, ``attn.get_attention_scores`` then ``bmm``), which is also how diffusers' SAG
    pipeline computes its map, so masks match the reference bit for bit. Above it, the output comes from
    fused scaled-dot-product attention and the map from :func:`aggregated_map_chunked` (memory-flat). The
    head count is the module's own (``attn.heads``).
    """

    def __init__(self, name: str, state: GuidanceState, limits: MapLimits = DEFAULT_MAP_LIMITS):
        self.name = name
        self.state = state
        self.limits = limits

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        hidden_states, shape4 = _to_tokens(attn, hidden_states, temb)
        grid = None if shape4 is None else (shape4[2], shape4[3])
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        n_probs = batch_size * heads * sequence_length * sequence_length

        if n_probs <= self.limits.exact_max_elements:
            query = attn.head_to_batch_dim(query)
            key = attn.head_to_batch_dim(key)
            value = attn.head_to_batch_dim(value)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            probs = attn.get_attention_scores(query, key, attention_mask)
            if self.state.capture:
                agg = probs.reshape(batch_size, heads, sequence_length, -1).mean(1).sum(1)
                self.state.maps[self.name] = (agg, grid)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        else:
            head_dim = key.shape[-1] // heads
            query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
            key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
            value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])
            if self.state.capture:
                if attention_mask is not None:
                    raise NotImplementedError("memory-flat attention maps do not support attention masks")
                rows = self.state.capture_rows or batch_size
                agg = aggregated_map_chunked(
                    query[:rows], key[:rows], attn.scale, self.limits.chunk_elements
                ).to(query.dtype)
                self.state.maps[self.name] = (agg, grid)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)

        return _from_tokens(attn, hidden_states, residual, shape4)


def _accepts(processor: object) -> set[str]:
    return set(inspect.signature(processor.__call__).parameters)


class IdentityPerturbation:
    """PAG processor: the trailing ``state.perturbed_rows`` rows of the batch get identity self-attention.

    The other rows go through the processor that was installed before (``inner``), unchanged. For the
    perturbed rows the attention matrix is the identity, so the output is ``to_out(to_v(x))``, as in the
    PAG paper and diffusers' ``PAGIdentitySelfAttnProcessor2_0``.
    """

    def __init__(self, inner: object, state: GuidanceState):
        self.inner = inner
        self.state = state
        self._inner_takes_temb = "temb" in _accepts(inner)

    def _call_inner(self, attn, hidden_states, attention_mask, temb):
        kwargs = {"temb": temb} if (self._inner_takes_temb and temb is not None) else {}
        return self.inner(
            attn, hidden_states, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        n = self.state.perturbed_rows
        if n <= 0:
            return self._call_inner(attn, hidden_states, attention_mask, temb)
        total = hidden_states.shape[0]
        keep = total - n

        def rows(t: Tensor | None, sl: slice) -> Tensor | None:
            return t[sl] if (t is not None and t.shape[0] == total) else t

        out_keep = (
            self._call_inner(
                attn, hidden_states[:keep], rows(attention_mask, slice(0, keep)), rows(temb, slice(0, keep))
            )
            if keep > 0
            else None
        )
        out_perturbed = identity_attention(attn, hidden_states[keep:], rows(temb, slice(keep, None)))
        return out_perturbed if out_keep is None else torch.cat([out_keep, out_perturbed])


def identity_attention(attn: Attention, hidden_states: Tensor, temb: Tensor | None = None) -> Tensor:
    """A self-attention layer whose attention matrix is the identity: to_out(to_v(x)), with the module's
    own norms, residual connection and output rescaling."""
    tokens, shape4 = _to_tokens(attn, hidden_states, temb)
    return _from_tokens(attn, attn.to_v(tokens), hidden_states, shape4)


def _to_tokens(
    attn: Attention, hidden_states: Tensor, temb: Tensor | None
) -> tuple[Tensor, torch.Size | None]:
    """diffusers' processor preamble: spatial norm, (B, C, H, W) -> (B, HW, C) tokens, group norm.
    Returns the tokens and the 4-d input shape (None for token input)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4 = None
    if hidden_states.ndim == 4:
        shape4 = hidden_states.shape
        b, c, h, w = shape4
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, shape4


def _from_tokens(attn: Attention, out: Tensor, residual: Tensor, shape4: Size | None) -> Tensor:
    """diffusers' processor epilogue: output projection and dropout, back to (B, C, H, W) where the
    input was 4-d, residual connection, output rescaling."""
    out = attn.to_out[1](attn.to_out[0](out))
    if shape4 is not None:
        out = out.transpose(-1, -2).reshape(shape4)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock a guided run holds on ``model`` while its processors (and, in attnguide.guide, its
    forward) are replaced: concurrent runs on one model take turns instead of seeing each other's
    processors. Re-entrant, so one thread may nest runs."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class ProcessorSwap:
    """Context manager: install processors on named attention modules, restore the originals on exit,
    also when the body raises."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._originals: dict[str, object] = {}
        self._modules = dict(model.named_modules())

    def install(self, name: str, make: callable) -> None:
        """Replace the processor of module ``name`` by ``make(current_processor)``."""
        module = self._modules[name]
        if name not in self._originals:
            self._originals[name] = module.processor
        module.set_processor(make(module.processor))

    def restore(self) -> None:
        for name, proc in self._originals.items():
            self._modules[name].set_processor(proc)
        self._originals.clear()

    def __enter__(self) -> ProcessorSwap:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def install_guidance_processors(
    swap: ProcessorSwap,
    state: GuidanceState,
    capture_layers: Iterable[str],
    perturb_layers: Iterable[str],
    limits: MapLimits = DEFAULT_MAP_LIMITS,
) -> None:
    """Capture processors first, then PAG wrappers around whatever is installed (a capture processor where
    a layer is both), so the captured map always comes from the unperturbed rows."""
    for name in capture_layers:
        swap.install(name, lambda _old, name=name: AttentionMapCapture(name, state, limits))
    for name in perturb_layers:
        swap.install(name, lambda old: IdentityPerturbation(old, state))
