"""The guidance-term protocol: what a term class declares, and what the guided step asks of it.

A guidance term is one frozen, validated dataclass in one file of this package (``sag.py``, ``pag.py``,
...), readable next to its paper's equations. Every term is "the prediction minus a weaker prediction",
times its scale (SAG paper Eq. 12; classifier guidance is a shift instead). The step
(:class:`attnguide.engine.step.Guider`) asks each active term, in the same words for every term:

1. ``rows``: how many row blocks of the conditional branch it adds to the step's one batched model call
   (1 for the perturbations PAG, SEG, TPG, SLG: their weak prediction has the same input);
2. ``attention_layers`` + :meth:`Term.attend`: what it does inside the self-attention of its layers,
   for its own rows (PAG: identity attention; SEG: blurred queries); ``capture_layers``: the layers whose
   attention maps it reads (SAG);
3. ``blocks`` + :meth:`Term.before_block` / :meth:`Term.after_block`: what it does around whole blocks
   for its rows (TPG: shuffled tokens; SLG: skipped blocks);
4. :meth:`Term.extra_pass`: a weak prediction of its own, computed after the batched call (SAG's pass on
   the degraded input);
5. :meth:`Term.delta`: its share of the guided prediction (the formula), at its :meth:`Term.scale_at`;
6. ``window``: the fraction of the sampling steps where it acts; ``separate_call``: which call it belongs
   to where a pipeline makes the CFG branches in two denoiser calls.

Classifier-free guidance is not a term: it is the combine rule the step is given
(:mod:`attnguide.engine.combine`). A CFG rule (APG, CFG-Zero*, TCFG, FDG, the guidance interval) is a
term whose share replaces that rule by its own (:mod:`.rule`). What the applications offer of a term
(CLI flags, demo fields, ``Arm`` fields, method names) is declared by its ``app`` (:class:`AppSpec`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..checks import check_scale, check_window
from ..combine import combine

__all__ = [
    "AppParam",
    "AppSpec",
    "AttentionCall",
    "Method",
    "StepContext",
    "StepOutputs",
    "Term",
    "in_window",
    "keyword",
    "scale_param",
]


def keyword(name: str, **kw: Any) -> Any:
    """A dataclass field whose pipeline keyword is ``name`` instead of ``<term>_<field>`` (diffusers'
    ``pag_applied_layers``); the other arguments are ``dataclasses.field``'s."""
    return field(metadata={"keyword": name}, **kw)


def in_window(window: tuple[float, float], step: int, num_steps: int) -> bool:
    """Whether sampling step ``step`` (0-based, of ``num_steps``) falls inside a (start, stop) window."""
    if window == (0.0, 1.0):
        return True
    frac = step / max(1, num_steps)
    return window[0] <= frac < window[1]


# ---------------------------------------------------------------------------------------------- app side
@dataclass(frozen=True)
class AppParam:
    """One setting of a term that the applications offer.

    ``name``: the ``Arm`` field is ``<term>_<name>``. ``default``: the ``Arm`` default (a scale's is 0:
    the term is off). ``field``: the term's dataclass field it sets (None: :meth:`Term.from_app` reads it).
    ``flag``: the ``attnguide sample`` flag (None: not offered); ``app_default``: its default there and in
    the demo (the bundled model's setting; ``why`` says where it differs from the library's).
    ``label``: the demo field (None: not in the demo). ``low`` / ``high`` / ``low_open``: the numeric
    range offered (``inf_allowed``: "inf" too, the CLI and the demo take it as text; ``inf_means``: what
    inf means); the CLI and the demo offer the same range. ``caption``: how the demo's caption names the
    setting ("blur sigma").
    """

    name: str
    default: Any
    field: str | None = None
    flag: str | None = None
    app_default: Any = None
    label: str | None = None
    low: float = 0.0
    high: float = 100.0
    low_open: bool = False
    inf_allowed: bool = False
    inf_means: str = ""
    help: str = ""
    why: str = ""
    caption: str = ""

    def allowed(self) -> str:
        """The range in words: "a number in [0, 100]", "a number > 0, or inf (what inf means)"."""
        if self.inf_allowed:
            means = f" ({self.inf_means})" if self.inf_means else ""
            return f"a number {'>' if self.low_open else '>='} {self.low:g}, or inf{means}"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def accepts(self, value: float) -> bool:
        """Whether ``value`` is in the offered range (NaN never is)."""
        if value != value:
            return False
        above = value > self.low if self.low_open else value >= self.low
        if self.inf_allowed:
            return above
        return above and math.isfinite(value) and value <= self.high


def scale_param(term: str, title: str, app_default: float, *, why: str = "") -> AppParam:
    """The scale setting of a term: the ``Arm`` field ``<term>_scale`` (0: off), the flag
    ``--<term>-scale`` (default ``app_default``; ``why`` it differs from the library's), and the demo
    field "<title> scale", both in [0, 100]."""
    flag, label = f"--{term}-scale", f"{title} scale"
    return AppParam("scale", 0.0, "scale", flag, app_default, label, why=why)


@dataclass(frozen=True)
class Method:
    """A method name of the applications that runs a term with some of its settings fixed (``fields``,
    by the term's field names), its ``title`` ("blur guidance"), where it is described (``cite``) and
    its weak prediction in words (``weak``)."""

    fields: Mapping[str, Any]
    title: str
    cite: str = ""
    weak: str = ""


@dataclass(frozen=True)
class AppSpec:
    """What the applications offer of a term: its settings (:class:`AppParam`; the first is the scale),
    its method names beside its own (``{"blur": Method({"mask": "global"}, "blur guidance")}``: a method
    that fixes some settings), its scale in the evaluation's rows (``eval_scale``; None: no row; with
    ``eval_options``), its cost per step (``passes``) and weak prediction (``weak``) in words for the
    methods tables, and whether its name is a method and a bench arm."""

    params: tuple[AppParam, ...]
    methods: Mapping[str, Method] = field(default_factory=dict)
    eval_scale: float | None = None
    eval_options: Mapping[str, Any] = field(default_factory=dict)
    passes: str = "+1 row block"
    weak: str = ""
    #: whether the term's own name is a method of the applications, and a bench arm
    method: bool = True
    bench: bool = True

    #: whether its methods need CFG (a CFG rule: only "cfg+<name>" is a method)
    needs_cfg: bool = False

    def param(self, name: str) -> AppParam:
        return next(p for p in self.params if p.name == name)


# ---------------------------------------------------------------------------------------------- step side
@dataclass
class StepOutputs:
    """The model outputs of one step (predictions without variance channels), each term's weak
    prediction (``weak``: the rows of a perturbation; SAG's degraded pass), each term's share of the
    guided prediction (``deltas``, by term name), and the step's model input ``x_in``."""

    out_cond: Tensor
    out_uncond: Tensor | None = None
    variance: Tensor | None = None
    weak: dict[str, Tensor] = field(default_factory=dict)
    deltas: dict[str, Tensor] = field(default_factory=dict)
    x_in: Tensor | None = None

    def combined(self, guidance_scale: float | None) -> Tensor:
        """CFG at ``guidance_scale`` with the unconditional output (None: no CFG, the conditional
        prediction), plus every term's delta (:func:`attnguide.engine.combine.combine`)."""
        uncond = None if guidance_scale is None else self.out_uncond
        return combine(self.out_cond, uncond, 1.0 if guidance_scale is None else guidance_scale, self.deltas)

    def terms_delta(self) -> Tensor:
        """What the guidance terms here (not CFG) add to the conditional prediction."""
        return self.combined(None) - self.out_cond


@dataclass
class AttentionCall:
    """One intercepted attention call, as a term's :meth:`Term.attend` sees it: where the image tokens
    sit among the call's query tokens (``image``: all of them for self- and cross-attention; a joint
    text + image sequence otherwise), the token grid of the image (``grid()``: (h, w), from the layer's
    feature map or the latent's size), the call's other ``scaled_dot_product_attention`` options, the
    layer's name, and the call's attention mask for the term's rows (None: none)."""

    image: slice
    grid: Callable[[], tuple[int, int]]
    options: dict[str, Any]
    layer: str
    mask: Tensor | None = None


@dataclass
class StepContext:
    """What a term's :meth:`Term.extra_pass` and :meth:`Term.delta` may read of one step: the model input
    ``x_in`` (after ``scale_model_input``), the timestep ``t``, the batched call's ``outputs``, whether it
    had an unconditional branch (``cfg``), the model's latent ``layout``, the prediction type, the noise
    level at ``t`` (``level()``), a model call on other inputs (``call(x, branches)`` -> predictions of
    the latent channels), the maps the capture layers recorded, the run's ``generator`` and
    ``record_mask`` (the Guider keeps SAG's masks for the pipelines' ``record_masks``); the step's place
    (``step`` of ``num_steps``, 0-based), the CFG weight w (None without CFG) and ``memory``, a dict that
    lives for one sampling run of one thread (a CFG rule's state across steps: APG's momentum)."""

    x_in: Tensor
    t: Tensor
    outputs: StepOutputs
    cfg: bool
    layout: Any
    prediction_type: str
    level: Callable[[], Any]
    call: Callable[[Tensor, Sequence[str]], Tensor]
    maps: dict[str, tuple[Tensor, tuple[int, int] | None]]
    capture_layers: Callable[[str], list[str]]
    generator: Any
    record_mask: Callable[[Tensor], None]
    step: int = 0
    num_steps: int = 1
    guidance_scale: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)


class Term:
    """Base of every guidance term (subclasses are frozen dataclasses with at least ``scale`` and
    ``window`` fields). The defaults here are those of a perturbation of the conditional branch: one row
    block, delta = s_t (c - weak)."""

    #: registry key, ``guide()`` keyword and prefix of the pipeline keywords (``<name>_scale``)
    name: ClassVar[str]
    #: display name ("SAG") and paper reference
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    #: row blocks of the conditional branch this term adds to the batched call
    rows: ClassVar[int] = 1
    #: the rows it acts on inside attention and around blocks: "own" (its row block), or "all" (every row
    #: of every model call of the step: a change of the model itself, as sparse cross-attention)
    acts_on: ClassVar[str] = "own"
    #: where the CFG branches come in two denoiser calls: the call this term rides in ("cond", "uncond",
    #: "both": a term that acts on every row; None: refused)
    separate_call: ClassVar[str | None] = "cond"
    #: whether its passes can be replayed from a CUDA graph (TPG draws a new permutation each pass: no)
    graph_safe: ClassVar[bool] = True
    #: "before" / "after" / None: whether it acts on whole blocks, before or after them
    block_hook: ClassVar[str | None] = None
    #: what the applications offer of it
    app: ClassVar[AppSpec]
    #: whether it reads the model output as the scheduler's eps / v / x0 (SAG's x0_hat, a classifier's
    #: shift), which some pipelines' preconditioned outputs are not
    reads_prediction: ClassVar[bool] = False
    #: whether ``attnguide.guide`` can apply its step window (classifier guidance: every step only)
    guide_window: ClassVar[bool] = True
    #: whether some attnguide pipeline runs it unless told not to (SAG's pipelines, the PAG drop-ins), so
    #: a call without it says ``<name>_scale=0``
    default_on_in_pipelines: ClassVar[bool] = False
    #: the default of ``<name>_scale`` in the pipelines' keywords (0: off unless asked for)
    pipeline_scale: ClassVar[float] = 0.0
    #: the branch its rows are conditioned as: "cond" (the conditional rows again), or its own name where
    #: the model function gives its rows their own inputs (:meth:`branch_inputs`; NAG: "nag")
    branch: ClassVar[str] = "cond"
    #: whether, inside attention, it sets the conditional rows' output from theirs and its own (:meth:`mix`)
    mixes_with_cond: ClassVar[bool] = False
    #: whether it is a CFG rule (:class:`attnguide.engine.terms.rule.CFGRule`): it combines the two CFG
    #: predictions its own way instead of u + w (c - u); it needs CFG, and a run takes at most one
    rule: ClassVar[bool] = False

    scale: float
    window: tuple[float, float]

    def check_scale_and_window(self) -> None:
        """ValueError naming ``<name>_scale`` / ``<name>_window`` for a bad scale or window (in
        ``__post_init__``; the window is stored as a float pair)."""
        check_scale(f"{self.name}_scale", self.scale, minimum=-math.inf)
        object.__setattr__(self, "window", check_window(f"{self.name}_window", self.window))

    # -------------------------------------------------------------------- resolution (before any call)
    def attention_layers(self, model: nn.Module) -> list[str]:
        """The attention layers (self-, joint or cross-attention) where :meth:`attend` acts (ValueError for
        a name that matches none)."""
        return []

    def capture_layers(self, model: nn.Module) -> list[str]:
        """The self-attention layers whose maps this term reads (SAG)."""
        return []

    def blocks(self, model: nn.Module) -> list[str]:
        """The blocks where :meth:`before_block` / :meth:`after_block` act."""
        return []

    def check_model(self, model: nn.Module, processors: Mapping[str, Any]) -> None:
        """ValueError before any model call where this term cannot act on ``model`` (its layers'
        ``processors`` by name)."""

    # -------------------------------------------------------------------- inside the model call
    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        """This term's attention output for its rows, (B, heads, N, d) tensors."""
        raise NotImplementedError(f"{type(self).__name__} does not act inside attention")

    def attend_linear(self, attn: Any, x: Tensor, layer: str) -> Tensor:
        """This term's output of a linear (ReLU-kernel, Sana) attention layer for its rows ``x``."""
        raise ValueError(f"`{self.name}`: layer {layer!r} is a linear attention, which has no {self.title}")

    def branch_inputs(
        self, kwargs: dict[str, Any], chunk: int, chunks: int, uncond: int | None
    ) -> dict[str, Any]:
        """The batched model inputs ``kwargs`` (``chunks`` equal chunks of rows, one per branch) with this
        term's chunk ``chunk`` (a copy of the conditional rows) given the inputs of its own branch;
        ``uncond``: the unconditional chunk, where the call has one (only for terms whose ``branch`` is
        their own)."""
        raise NotImplementedError(f"{type(self).__name__} has no branch of its own")

    def mix(self, out: Tensor, cond: slice, own: slice, call: AttentionCall) -> Tensor:
        """A layer's attention output (B, heads, N, d) with the conditional rows ``cond`` set from theirs
        and this term's rows ``own`` (only for terms that ``mixes_with_cond``)."""
        raise NotImplementedError(f"{type(self).__name__} does not mix with the conditional rows")

    def before_block(self, tokens: Tensor, generator: Any) -> Tensor:
        """The tokens (B, N, C) entering a block, for this term's rows."""
        raise NotImplementedError

    def after_block(self, block_input: Tensor, block_output: Tensor) -> Tensor:
        """A block's output for this term's rows, given its input."""
        raise NotImplementedError

    # -------------------------------------------------------------------- after the batched call
    def extra_pass(self, ctx: StepContext) -> Tensor | None:
        """A weak prediction that needs a model call of its own (SAG's degraded input), else None."""
        return None

    def reference(self, ctx: StepContext) -> Tensor:
        """The prediction this term's update is taken from: the conditional one."""
        return ctx.outputs.out_cond

    def scale_at(self, t: Tensor | float) -> float:
        """The scale at timestep ``t`` (constant unless the term says otherwise)."""
        return self.scale

    def delta(self, ctx: StepContext) -> Tensor | None:
        """This term's share of the guided prediction: s_t (ref - weak); None for a term whose effect is
        inside the predictions themselves (``acts_on == "all"``)."""
        return self.scale_at(ctx.t) * (self.reference(ctx) - ctx.outputs.weak[self.name])

    # -------------------------------------------------------------------- declarations
    @classmethod
    def keywords(cls) -> dict[str, dataclasses.Field]:
        """The term's dataclass fields by their pipeline keyword (``<name>_<field>``, or the field's own
        ``keyword``), for the fields a keyword can carry (not callables)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("keyword", "") is None:
                continue
            out[f.metadata.get("keyword") or f"{cls.name}_{f.name}"] = f
        return out

    @classmethod
    def from_keywords(cls, values: Mapping[str, Any]) -> Term:
        """The term from pipeline keywords (``values`` by keyword; missing ones take the defaults)."""
        return cls(**{f.name: values[k] for k, f in cls.keywords().items() if k in values})

    @classmethod
    def methods(cls) -> dict[str, dict[str, Any]]:
        """The method names of the applications that run this term, with the fields each one sets."""
        own = {cls.name: {}} if cls.app.method else {}
        return {**own, **{k: dict(v.fields) for k, v in cls.app.methods.items()}}

    @classmethod
    def method_title(cls, method: str) -> str:
        """How the applications name a method of this term ("SAG", "blur guidance")."""
        return cls.app.methods[method].title if method in cls.app.methods else cls.title

    @classmethod
    def from_app(cls, values: Mapping[str, Any]) -> Term | None:
        """The term of an ``Arm``'s settings (``values`` by :class:`AppParam` name); None when off."""
        if values["scale"] == 0:
            return None
        kwargs = {}
        for p in cls.app.params:
            if p.field is not None:
                v = values[p.name]
                kwargs[p.field] = math.inf if (v is None and p.inf_allowed) else v
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})

    @classmethod
    def app_canonical(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with the settings that do not change the samples reset (every one when off)."""
        if values["scale"] == 0:
            return {p.name: p.default for p in cls.app.params}
        return values

    @classmethod
    def app_key(cls, values: Mapping[str, Any]) -> str:
        """A file-name-safe part of an ``Arm`` key, e.g. ``pag3`` (canonical values; "" when off)."""
        if values["scale"] == 0:
            return ""
        extra = [
            f"{p.name}{_fmt(values[p.name])}"
            for p in cls.app.params[1:]
            if values[p.name] != p.default and p.name != "window"
        ]
        if "window" in values and tuple(values["window"]) != tuple(cls.app.param("window").default):
            lo, hi = values["window"]
            extra.append(f"win{lo:g}-{hi:g}")
        return "-".join([f"{cls.key_prefix()}{values['scale']:g}", *extra])

    @classmethod
    def key_prefix(cls) -> str:
        return cls.name


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
