"""Attention interception: the processor attnguide wraps around the one installed on a layer.

* :class:`GuidedAttention` wraps the processor installed on a self-attention layer and, during a guided
  model call only, intercepts its ``scaled_dot_product_attention``: to record the layer's aggregated map
  (mean over heads, sum over queries: SAG paper, arXiv:2210.00939, Eq. 13 before reshaping) for the terms
  that read maps, and to hand each term that acts in the layer its own rows of the batch (the term's
  :meth:`attnguide.engine.terms.Term.attend`: PAG's identity attention, SEG's blurred queries). Every
  argument reaches the wrapped processor, so the model is never changed beyond the guidance.
* :class:`ProcessorSwap` installs processors and always restores the originals; :func:`model_lock`
  serialises guided runs on one model. Which layers: :mod:`attnguide.engine.layers`.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor2_0,
    AttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
)
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .degrade import infer_grid
from .terms.base import AttentionCall, Term


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


#: diffusers' processors without a ``scaled_dot_product_attention`` call, by class name, and their twin
#: that computes the same attention with one (their slicing or xformers only change the memory).
SDPA_TWINS: dict[str, type] = {
    "AttnProcessor": AttnProcessor2_0,
    "SlicedAttnProcessor": AttnProcessor2_0,
    "XFormersAttnProcessor": AttnProcessor2_0,
    "AttnAddedKVProcessor": AttnAddedKVProcessor2_0,
    "SlicedAttnAddedKVProcessor": AttnAddedKVProcessor2_0,
    "XFormersAttnAddedKVProcessor": AttnAddedKVProcessor2_0,
}


@dataclass
class GuidanceState:
    """What the installed processors do in the current model call of one thread.

    ``groups``: the rows of the model's batch of ``batch_rows`` that each term's branch holds, by term
    name: (start, stop); the processors and block hooks of a term act on its rows only. ``cond_rows``:
    the conditional branch's rows (NAG sets them inside attention). ``everywhere``: the terms that act
    on every row of every model call of the step (``Term.acts_on == "all"``). ``capture``: whether
    capture processors record their map; ``capture_rows``: how many leading rows of the model
    batch need it (0: all). A layer that sees k rows per model row (video frames, or spatial tokens in
    temporal layers) scales these by k. ``maps``: the aggregated maps recorded, per layer path: (rows, N)
    and the token grid (None where the layer saw tokens). ``thread``: the thread whose guided pass this
    is; the processors leave other threads' calls alone (a call that began before the guided run
    installed them). None: any thread (inside torch.compile). ``image_tokens``: how many image tokens the
    model call has, where a layer's own sequence can also hold text tokens (Flux's single-stream blocks:
    [text, image]); 0: a layer's own tokens are the image. ``image_size``: the (H, W) of the model
    input's latent, from which a token layer's grid is read (SEG); ``frames``: the frames of a video
    latent (B, C, F, H, W), which a video transformer's layers hold in one sequence (F x h x w tokens,
    frame-major) where a video UNet's hold them as rows.
    """

    groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    cond_rows: tuple[int, int] | None = None
    everywhere: frozenset[str] = frozenset()
    image_tokens: int = 0
    image_size: tuple[int, int] | None = None
    frames: int = 1
    thread: int | None = None
    capture: bool = False
    capture_rows: int = 0
    batch_rows: int = 0
    maps: dict[str, tuple[Tensor, tuple[int, int] | None]] = field(default_factory=dict)

    def this_thread(self) -> bool:
        """Whether the calling thread is the one whose guided pass this is (always, when compiling)."""
        if self.thread is None or torch.compiler.is_compiling():
            return True
        return self.thread == threading.get_ident()

    def layer_rows(self, rows: int, layer_batch: int) -> int:
        """``rows`` model rows expressed in the rows of a layer whose batch is ``layer_batch``."""
        if self.batch_rows <= 0 or layer_batch == self.batch_rows:
            return rows
        if layer_batch % self.batch_rows:
            raise RuntimeError(
                f"attnguide: a self-attention layer saw a batch of {layer_batch} rows for a model batch of "
                f"{self.batch_rows}; cannot tell which rows belong to which branch"
            )
        return rows * (layer_batch // self.batch_rows)

    def row_plan(self, layer_batch: int, acting: Iterable[str]) -> list[tuple[slice, str | None]]:
        """The rows of a layer batch of ``layer_batch`` in order, each run by one of the ``acting`` terms
        (its group; all rows for a term that acts everywhere) or normally (None)."""
        everywhere = [t for t in acting if t in self.everywhere]
        if everywhere:
            return [(slice(0, layer_batch), everywhere[0])]
        plan: list[tuple[slice, str | None]] = []
        pos = 0
        mine = {t: span for t, span in self.groups.items() if t in set(acting)}
        for term, (start, stop) in sorted(mine.items(), key=lambda item: item[1]):
            lo, hi = self.layer_rows(start, layer_batch), self.layer_rows(stop, layer_batch)
            if lo > pos:
                plan.append((slice(pos, lo), None))
            plan.append((slice(lo, hi), term))
            pos = hi
        if pos < layer_batch:
            plan.append((slice(pos, layer_batch), None))
        return plan


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


class _SDPAIntercept(TorchFunctionMode):
    """While the wrapped processor runs: its ``scaled_dot_product_attention`` call goes to ``handler``,
    which sees the final q, k, v (after the processor's norms and rotary embeddings). Only the first
    call is the layer's attention; later ones (IP-adapter image attention) and every other function run
    as they are. Torch function modes are per thread."""

    def __init__(self, handler: Callable[..., Tensor]):
        super().__init__()
        self.handler = handler
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.calls == 0:
            self.calls += 1
            return self.handler(*args, **kwargs)
        return func(*args, **kwargs)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """The arguments of one ``scaled_dot_product_attention`` call, by name."""
    named = dict(zip(_SDPA_ARGS, args, strict=False))
    named.update(kwargs)
    return named


def _rows(t: Tensor | None, sl: slice, total: int) -> Tensor | None:
    """Rows ``sl`` of a per-row tensor (an attention mask of the whole batch); broadcast ones as they are."""
    return t[sl] if (isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == total) else t


class GuidedAttention:
    """The processor attnguide puts on a self-attention layer: it wraps the processor that was installed
    (``inner``: diffusers' default, IP-adapter, fused or custom processors, rotary embeddings ...) and
    passes every argument through. Only its ``scaled_dot_product_attention`` call is intercepted, and only
    while the current thread's guided run asks for it:

    * ``capture`` (SAG, arXiv:2210.00939, Eq. 13 before reshaping): the attention probabilities of the
      leading rows, mean over heads, summed over queries, recorded in ``state.maps[name]``. Up to
      ``limits.exact_max_elements`` probabilities they are computed as diffusers' ``AttnProcessor`` and
      SAG pipeline do (``attn.get_attention_scores``, then ``bmm``: bit-identical masks); above it, the
      output comes from the fused kernel and the map from :func:`aggregated_map_chunked` (memory-flat).
    * ``terms``: the terms that act in this layer, by name; each gets its own rows of the batch
      (``state.groups``) through its :meth:`~attnguide.engine.terms.Term.attend` (softmax attention) or
      :meth:`~attnguide.engine.terms.Term.attend_linear` (Sana's linear attention).

    Outside a guided call (``state`` asks for nothing) it is the inner processor. :func:`guided_attention`
    builds one with the inner processor's call signature, which diffusers reads to decide which keyword
    arguments reach it. The state is a plain object (no thread lookups), so the processor compiles into a
    ``torch.compile``d model without graph breaks; the guided step serialises its use across threads.
    """

    def __init__(
        self,
        inner: object,
        name: str,
        state: GuidanceState,
        *,
        capture: bool = False,
        terms: Mapping[str, Term] | None = None,
        limits: MapLimits = DEFAULT_MAP_LIMITS,
    ):
        self.inner, self.name, self.state = inner, name, state
        self.capture, self.limits = capture, limits
        self.terms = dict(terms or {})
        # diffusers' processors that compute attention without scaled_dot_product_attention (explicit
        # matrices, slices of them, xformers) have a twin that computes the same with it: that one runs
        # in their place during guided calls, where the attention call must be intercepted.
        twin = SDPA_TWINS.get(type(inner).__name__)
        self._guided_inner = twin() if twin is not None else inner
        self._order: str | None = None  # where a joint processor of unknown order puts the image tokens

    def __call__(self, attn: Attention, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        st = self.state
        capture = self.capture and st.capture
        acting = [name for name in self.terms if name in st.groups or name in st.everywhere]
        if not (capture or acting) or not st.this_thread():
            return self.inner(attn, hidden_states, *args, **kwargs)
        grid = tuple(hidden_states.shape[2:]) if hidden_states.ndim == 4 else None
        if isinstance(self.inner, SanaLinearAttnProcessor2_0):
            return self._linear_attention(attn, st, capture, acting, grid, hidden_states, args, kwargs)
        own = grid[0] * grid[1] if grid is not None else hidden_states.shape[1]  # the layer's own tokens
        n_img = st.image_tokens if 0 < st.image_tokens < own else own  # [text, image] in one sequence
        mode = _SDPAIntercept(
            lambda *a, **kw: self._attention(
                attn, st, capture, acting, grid, (n_img, hidden_states), _sdpa_arguments(a, kw)
            )
        )
        with mode:
            out = self._guided_inner(attn, hidden_states, *args, **kwargs)
        if mode.calls == 0:
            raise ValueError(
                f"attnguide: the processor of layer {self.name!r} ({type(self.inner).__name__}) computes "
                "attention without torch's scaled_dot_product_attention, so its map and identity attention "
                "cannot be taken; install diffusers' AttnProcessor2_0 there (or choose another layer)"
            )
        return out

    def _image_tokens(self, n: int, n_img: int, k_len: int, order: Callable[[], str | None]) -> slice:
        """Where the ``n_img`` image tokens sit among the ``n`` query tokens of one attention call: all of
        them (self-attention; cross-attention, whose keys are another sequence's), else the joint-attention
        order of the inner processor (known, else ``order()``: read from the call's values)."""
        if n == n_img:
            return slice(0, n)
        if k_len != n or n < n_img:
            raise ValueError(
                f"attnguide: layer {self.name!r} is neither a self-attention nor a joint attention over its "
                f"own {n_img} tokens (queries {n}, keys {k_len}); choose a self-attention layer"
            )
        where = joint_image_position(self.inner) or order()
        if where is None:
            raise ValueError(
                f"attnguide: layer {self.name!r} attends over {n} tokens of which {n_img} are the image's, "
                f"and where {type(self.inner).__name__} puts them cannot be read (its values are not the "
                "layer's value projection of its own tokens at either end); choose another layer"
            )
        return slice(0, n_img) if where == "first" else slice(n - n_img, n)

    def _joint_order(self, attn: Attention, hidden_states: Tensor, v: Tensor, n_img: int) -> str | None:
        """Where a joint-attention processor put the layer's own ``n_img`` tokens in the sequence: "first"
        or "last", read once per layer by comparing the first row's values at each end with the layer's
        value projection of its input (``to_v``: a linear map per token, before any positional
        embedding); None where neither end (or both) matches."""
        if self._order is not None:
            return self._order
        to_v = getattr(attn, "to_v", None)
        if to_v is None or hidden_states.ndim != 3 or hidden_states.shape[1] != n_img:
            return None
        heads = v.shape[1]
        own = to_v(hidden_states[:1]).reshape(1, n_img, heads, -1).transpose(1, 2).to(v.dtype)
        tol = 1e-3 * float(own.abs().max()) + 1e-6

        def near(part: Tensor) -> bool:
            return part.shape == own.shape and bool(((part - own).abs() <= tol).all())

        first, last = near(v[:1, :, :n_img]), near(v[:1, :, -n_img:])
        if first != last:
            self._order = "first" if first else "last"
        return self._order

    def _attention(self, attn, st: GuidanceState, capture, acting, grid, own: tuple, a: dict) -> Tensor:
        """One intercepted ``scaled_dot_product_attention(query, key, value, ...)`` on (B, heads, N, d)
        tensors: each acting term's attention for its rows, map capture for the leading rows. ``own``:
        (the number of image tokens, the layer's input); a longer sequence is joint attention (SD3: image
        tokens first; Flux: text first)."""
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        b, n = q.shape[0], q.shape[-2]
        n_img, hidden_states = own
        image = self._image_tokens(
            n, n_img, k.shape[-2], lambda: self._joint_order(attn, hidden_states, v, n_img)
        )
        options = {name: a[name] for name in _SDPA_ARGS[4:] if name in a}
        call = AttentionCall(
            image, lambda: grid if grid is not None else self._grid(st, n_img, b), options, self.name
        )
        parts = []
        for rows, term in st.row_plan(b, acting):
            qkv = (q[rows], k[rows], v[rows])
            if term is not None:
                parts.append(
                    self.terms[term].attend(*qkv, dataclasses.replace(call, mask=_rows(mask, rows, b)))
                )
            elif capture and rows.start == 0 and self.name not in st.maps:
                rows_map = st.layer_rows(st.capture_rows, b) if st.capture_rows else rows.stop
                parts.append(
                    self._attend_capturing(
                        attn, st, qkv, _rows(mask, rows, b), options, (n, n_img, image), grid, rows_map
                    )
                )
            else:
                parts.append(F.scaled_dot_product_attention(*qkv, attn_mask=_rows(mask, rows, b), **options))
        out = parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].dtype) for p in parts])
        text = k.shape[-2] != n or n != n_img  # the image attends to text here (cross or joint attention)
        for name in acting:
            term = self.terms[name]
            if term.mixes_with_cond and text and st.cond_rows is not None and name in st.groups:
                cond = slice(st.layer_rows(st.cond_rows[0], b), st.layer_rows(st.cond_rows[1], b))
                mine = slice(st.layer_rows(st.groups[name][0], b), st.layer_rows(st.groups[name][1], b))
                out = term.mix(out, cond, mine, dataclasses.replace(call, mask=None))
        return out

    def _grid(self, st: GuidanceState, n_img: int, layer_batch: int) -> tuple[int, int]:
        """The token grid of one frame of a layer that sees tokens (not a 4-D feature map), from the
        latent's size. A layer with one row per model row of a video holds its frames in one sequence
        (Wan: F x h x w tokens); a layer with a row per frame (video UNets) holds one frame per row."""
        if st.image_size is None:
            raise ValueError(f"attnguide: the token grid of layer {self.name!r} is unknown (no image size)")
        frames = st.frames if st.frames > 1 and layer_batch == st.batch_rows else 1
        if n_img % frames:
            raise ValueError(
                f"attnguide: layer {self.name!r} sees {n_img} image tokens per row, not a whole number of "
                f"tokens for each of the latent's {frames} frames; choose another layer"
            )
        return infer_grid(n_img // frames, *st.image_size)

    def _attend_capturing(self, attn, st, qkv, mask, options: dict, tokens, grid, rows: int) -> Tensor:
        """The attention of the leading (unperturbed) rows, recording the SAG map of the first ``rows`` of
        them in ``st.maps``. ``tokens``: (all tokens, image tokens) of the call."""
        q, k, v = qkv
        n, n_img, image = tokens
        if k.shape[-2] != n:
            raise ValueError(
                f"`sag_layers`: layer {self.name!r} is a cross-attention ({n} queries, {k.shape[-2]} keys); "
                "SAG's map is a self-attention's"
            )
        rows = min(rows, q.shape[0])
        if n == n_img:
            out, agg = self._attend_and_map(attn, q, k, v, mask, options, rows)
        else:  # joint: image queries x image keys, rows renormalised over the image keys
            if mask is not None:
                raise NotImplementedError("SAG maps of joint attention with an attention mask")
            scale = options.get("scale") or q.shape[-1] ** -0.5
            agg = aggregated_map_chunked(
                q[:rows, :, image], k[:rows, :, image], scale, self.limits.chunk_elements
            ).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
        st.maps[self.name] = (agg, grid)
        return out

    def _linear_attention(self, attn, st, capture, acting, grid, x: Tensor, args, kwargs) -> Tensor:
        """Sana's linear (ReLU-kernel) self-attention, which has no attention call to intercept: the
        installed processor on the normal rows, each acting term's :meth:`attend_linear` on its rows, and
        the map of :func:`linear_attention_map`."""
        b = x.shape[0]
        if capture and self.name not in st.maps:
            rows = st.layer_rows(st.capture_rows, b) if st.capture_rows else b
            st.maps[self.name] = (linear_attention_map(attn, x[:rows]).to(x.dtype), grid)
        parts = []
        for rows, term in st.row_plan(b, acting):
            if term is not None:
                parts.append(self.terms[term].attend_linear(attn, x[rows], self.name))
            else:
                rows_of = lambda v, rows=rows: _rows(v, rows, b)  # noqa: E731
                sub_kwargs = {k: rows_of(v) for k, v in kwargs.items()}
                parts.append(self.inner(attn, x[rows], *map(rows_of, args), **sub_kwargs))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _attend_and_map(self, attn, q, k, v, mask, options: dict, rows: int) -> tuple[Tensor, Tensor]:
        """The attention output of all rows and the aggregated map (B, N) of the first ``rows``."""
        b, heads, n, d = q.shape
        m = k.shape[-2]
        scale = options.get("scale")
        scale = d**-0.5 if scale is None else scale  # what the fused kernel uses by default
        if b * heads * n * m <= self.limits.exact_max_elements:
            # As diffusers' AttnProcessor (and SAG pipeline): get_attention_scores' probabilities, then bmm.
            if mask is not None:
                if mask.dtype == torch.bool:
                    zeros = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                    mask = zeros.masked_fill(~mask, -torch.inf)
                mask = mask.expand(b, heads, n, m).reshape(b * heads, n, m)
            probs = _scores(attn, q.reshape(b * heads, n, d), k.reshape(b * heads, m, d), mask, scale)
            agg = probs.reshape(b, heads, n, m)[:rows].mean(1).sum(1)
            out = torch.bmm(probs, v.reshape(b * heads, m, v.shape[-1])).reshape(b, heads, n, -1)
            return out, agg
        if mask is not None:
            raise NotImplementedError("memory-flat attention maps do not support attention masks")
        agg = aggregated_map_chunked(q[:rows], k[:rows], scale, self.limits.chunk_elements).to(q.dtype)
        options = {key: val for key, val in options.items() if key != "scale"}
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **options), agg


def linear_attention_map(attn: Attention, tokens: Tensor, eps: float = 1e-15) -> Tensor:
    """SAG's aggregated map (B, N) of a ReLU-kernel linear attention layer (Sana), in O(N d).

    The layer's implicit attention matrix is A_ij = phi(q_i) . phi(k_j) / Z_i with phi = ReLU and
    Z_i = phi(q_i) . sum_j phi(k_j) (+ eps, as diffusers), so each row sums to 1 and the mass key j
    receives is sum_i A_ij = phi(k_j) . sum_i phi(q_i) / Z_i: no N x N matrix. Mean over heads, then
    scaled to mean 1 per image (a query whose kernel is all zero attends to nothing), so that the
    threshold psi = 1.0 is the mean, as for softmax maps."""
    b, n, _ = tokens.shape
    q = F.relu(attn.to_q(tokens).float()).view(b, n, attn.heads, -1).transpose(1, 2)  # (B, H, N, d)
    k = F.relu(attn.to_k(tokens).float()).view(b, n, attn.heads, -1).transpose(1, 2)
    z = (q * k.sum(dim=2, keepdim=True)).sum(-1, keepdim=True) + eps  # (B, H, N, 1)
    weights = (q / z).sum(dim=2, keepdim=True)  # (B, H, 1, d)
    agg = (k * weights).sum(-1).mean(dim=1)
    return agg / agg.mean(dim=1, keepdim=True).clamp_min(eps)


def joint_image_position(processor: object) -> str | None:
    """Where a joint-attention processor puts the image tokens in its one sequence: "first" (diffusers'
    SD3 processors: [image, text]), "last" (Flux's double- and single-stream blocks: [text, image]), or
    None where attnguide does not know it."""
    name = type(processor).__name__
    if "Flux" in name:
        return "last"
    if "Joint" in name:
        return "first"
    return None


def _scores(attn: Attention, query: Tensor, key: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """diffusers' ``Attention.get_attention_scores`` (baddbmm, upcasts, softmax) with the scale of the
    intercepted call: the same probabilities as diffusers' ``AttnProcessor`` and SAG pipeline."""
    dtype = query.dtype
    if getattr(attn, "upcast_attention", False):  # Attention has it; WanAttention and others do not
        query, key = query.float(), key.float()
    if mask is None:
        shape = (query.shape[0], query.shape[1], key.shape[1])
        base, beta = torch.empty(shape, dtype=query.dtype, device=query.device), 0
    else:
        base, beta = mask, 1
    scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=scale)
    if getattr(attn, "upcast_softmax", False):
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


_GUIDED_TYPES: dict[type, type] = {}


def guided_attention(inner: object, name: str, state: GuidanceState, **options) -> GuidedAttention:
    """A :class:`GuidedAttention` around ``inner`` whose ``__call__`` has ``inner``'s signature.

    diffusers' ``Attention.forward`` passes a keyword argument (``image_rotary_emb``, ``temb``, IP-adapter
    inputs, ...) to its processor only where the processor's signature names it; with the inner signature
    the wrapped processor gets exactly what it would get alone.
    """
    cls = type(inner)
    wrapper = _GUIDED_TYPES.get(cls)
    if wrapper is None:
        base = GuidedAttention.__call__
        # A copy of the function (not a forwarding call), so torch.compile inlines it like any method;
        # inspect.signature follows __wrapped__ to the inner class's __call__.
        call = types.FunctionType(base.__code__, base.__globals__, "__call__", base.__defaults__)
        call.__wrapped__ = cls.__call__
        call.__qualname__ = f"Guided{cls.__name__}.__call__"
        wrapper = type(f"Guided{cls.__name__}", (GuidedAttention,), {"__call__": call})
        _GUIDED_TYPES[cls] = wrapper
    return wrapper(inner, name, state, **options)


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

    def install(self, name: str, make: Callable[[object], object]) -> None:
        """Replace the processor of module ``name`` by ``make(current_processor)``. ValueError where
        attnguide already guides that layer (a guided run nested in another on the same model)."""
        module = self._modules[name]
        if isinstance(module.processor, GuidedAttention) and name not in self._originals:
            raise ValueError(
                f"attnguide: layer {name!r} is already guided by another run on this model (nested guided "
                "runs on one model are not supported); put every term into one run"
            )
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
    acting: Mapping[str, tuple[Term, Iterable[str]]],
    limits: MapLimits = DEFAULT_MAP_LIMITS,
) -> None:
    """One :class:`GuidedAttention` around the installed processor of each layer that captures a map
    (SAG) or where a term acts (``acting``: each term's name -> (term, its layers)); a layer that
    captures computes its map from the rows no term acts on."""
    capture = list(capture_layers)
    acting = {name: (term, list(layers)) for name, (term, layers) in acting.items()}
    every = capture + [layer for _, layers in acting.values() for layer in layers]
    for layer in dict.fromkeys(every):
        mine = {name: term for name, (term, layers) in acting.items() if layer in layers}
        swap.install(
            layer,
            lambda old, layer=layer, mine=mine: guided_attention(
                old, layer, state, capture=layer in capture, terms=mine, limits=limits
            ),
        )
