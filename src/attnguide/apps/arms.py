"""One ``Arm`` type for every application: a sampling configuration, that is, which guidance terms run
at which scales. The CLI's grid columns, the demo's methods, the evaluation's arms and the benchmark's
arms are all ``Arm`` values; :meth:`Arm.from_method` reads the method names they share."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.degrade import mean_pixel_blur
from ..engine.guidance import PAG, SAG, SEG, SLG, TPG

#: Method names: guidance terms joined by "+" ("blur" is SAG with the global mask, the paper's Sec. 5.1).
METHODS = (
    "none",
    "sag",
    "blur",
    "pag",
    "seg",
    "tpg",
    "slg",
    "cfg",
    "cfg+sag",
    "cfg+pag",
    "cfg+seg",
    "cfg+tpg",
    "cfg+slg",
    "sag+pag",
)
#: Methods that need a conditional model (CFG).
CONDITIONAL_METHODS = frozenset(m for m in METHODS if "cfg" in m.split("+"))
#: The guidance terms that method names join.
TERMS = ("cfg", "sag", "blur", "pag", "seg", "tpg", "slg")
#: The terms whose weak prediction perturbs the model's attention or blocks (they need self-attention).
ATTENTION_TERMS = frozenset({"sag", "pag", "seg", "tpg", "slg"})
#: Default scales of the terms beside CFG, SAG and PAG: the engine's (SEG 3, TPG 3, SLG 2.8).
DEFAULT_WEAK_SCALES = {"seg": SEG.scale, "tpg": TPG.scale, "slg": SLG.scale}


def method_terms(method: str) -> frozenset[str]:
    """The terms of a method name ("cfg+sag" -> {"cfg", "sag"}); ValueError for an unknown name."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return frozenset() if method == "none" else frozenset(method.split("+"))


@dataclass(frozen=True)
class Arm:
    """One sampling configuration.

    ``name``: a display name (not part of equality). ``conditional``: sample class labels (evaluation:
    ``i mod 10``; else the null label). ``cfg_scale``: CFG weight w (None: no CFG). ``sag_*``: the SAG
    term (scale 0: none): mask kind, blur sigma and kernel, the masked fraction of the random / square /
    high-frequency masks (None: calibrated to the attention mask's), ``sag_average``: the blur becomes
    the per-image mean pixel (sigma -> infinity), the step window. ``pag_scale``: PAG (0: none).
    ``steps_multiplier``: sample with that many times the sampling steps (the evaluation's sampler
    honours it), e.g. an unguided arm given as many model passes as a guided one (compute-matched).
    ``classifier_scale``: classifier guidance (ADM's ``classifier_scale`` s; 0: none) with the model's
    noise-aware classifier, towards the arm's labels (conditional arms; the evaluation's sampler builds
    the term, :class:`attnguide.engine.guidance.ClassifierGuidance`). ``seg_scale`` / ``seg_sigma``
    (None: infinity, the mean query), ``tpg_scale``, ``slg_scale`` / ``slg_window``: the SEG, TPG and SLG
    terms (scale 0: none) at the engine's default layers.
    """

    name: str = field(default="", compare=False)
    conditional: bool = False
    steps_multiplier: int = 1
    cfg_scale: float | None = None
    sag_scale: float = 0.0
    sag_mask: str = "attention"
    sag_sigma: float = 1.0
    sag_kernel: int = 9
    sag_fraction: float | None = None
    sag_average: bool = False
    sag_window: tuple[float, float] = (0.0, 1.0)
    pag_scale: float = 0.0
    classifier_scale: float = 0.0
    seg_scale: float = 0.0
    seg_sigma: float | None = None
    tpg_scale: float = 0.0
    slg_scale: float = 0.0
    slg_window: tuple[float, float] = SLG.window

    def __post_init__(self) -> None:
        m = self.steps_multiplier
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"`steps_multiplier` must be a positive integer, got {m!r}")
        sigma = self.seg_sigma
        if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
            raise ValueError(f"`seg_sigma` must be a number > 0 or None (infinity), got {self.seg_sigma!r}")

    @classmethod
    def from_method(
        cls,
        method: str,
        *,
        cfg_scale: float,
        sag_scale: float,
        pag_scale: float,
        blur_scale: float | None = None,
        seg_scale: float = DEFAULT_WEAK_SCALES["seg"],
        tpg_scale: float = DEFAULT_WEAK_SCALES["tpg"],
        slg_scale: float = DEFAULT_WEAK_SCALES["slg"],
        **options: Any,
    ) -> Arm:
        """The arm of a method name ("cfg+sag", "blur", "seg", ...) with the scales of the terms it names;
        ``blur_scale`` (default ``sag_scale``) is the scale of blur guidance. ``options``: other fields."""
        return cls.from_terms(
            method_terms(method),
            name=method,
            cfg_scale=cfg_scale,
            sag_scale=sag_scale,
            pag_scale=pag_scale,
            blur_scale=blur_scale,
            seg_scale=seg_scale,
            tpg_scale=tpg_scale,
            slg_scale=slg_scale,
            **options,
        )

    @classmethod
    def from_terms(
        cls,
        terms: Iterable[str],
        *,
        name: str = "",
        cfg_scale: float,
        sag_scale: float,
        pag_scale: float,
        blur_scale: float | None = None,
        seg_scale: float = DEFAULT_WEAK_SCALES["seg"],
        tpg_scale: float = DEFAULT_WEAK_SCALES["tpg"],
        slg_scale: float = DEFAULT_WEAK_SCALES["slg"],
        **options: Any,
    ) -> Arm:
        """Like :meth:`from_method` for any combination of :data:`TERMS` (e.g. {"cfg", "sag", "pag"}, which
        no method name lists); ValueError for an unknown term."""
        terms = frozenset(terms)
        if not terms <= set(TERMS):
            raise ValueError(f"terms must be among {', '.join(TERMS)}, got {sorted(terms - set(TERMS))}")
        blur = "blur" in terms
        sag = (blur_scale if blur_scale is not None else sag_scale) if blur else sag_scale
        return cls(
            name=name,
            cfg_scale=cfg_scale if "cfg" in terms else None,
            sag_scale=sag if terms & {"sag", "blur"} else 0.0,
            sag_mask="global" if blur else "attention",
            pag_scale=pag_scale if "pag" in terms else 0.0,
            seg_scale=seg_scale if "seg" in terms else 0.0,
            tpg_scale=tpg_scale if "tpg" in terms else 0.0,
            slg_scale=slg_scale if "slg" in terms else 0.0,
            **options,
        )

    # ------------------------------------------------------------------ what the arm runs
    @property
    def guidance_scale(self) -> float:
        """The pipelines' ``guidance_scale`` (CFG on above 1): ``cfg_scale``, or 1.0 without CFG."""
        return 1.0 if self.cfg_scale is None else self.cfg_scale

    @property
    def uses_classifier(self) -> bool:
        """Whether the arm adds classifier guidance (it then needs a conditional arm's labels)."""
        return self.classifier_scale != 0

    @property
    def uses_sag(self) -> bool:
        return self.sag_scale != 0

    @property
    def uses_attention_mask(self) -> bool:
        """Whether SAG runs with the self-attention mask (so there are masks to show)."""
        return self.uses_sag and self.sag_mask == "attention"

    @property
    def needs_calibration(self) -> bool:
        ablation = self.sag_mask in ("random", "random_tokens", "square", "highfreq")
        return self.uses_sag and ablation and self.sag_fraction is None

    def sag_term(self, layers: str | Sequence[str] | None = None) -> SAG | None:
        """The :class:`SAG` term of this arm (None without SAG)."""
        if not self.uses_sag:
            return None
        return SAG(
            scale=self.sag_scale,
            layers=layers,
            blur_kernel_size=self.sag_kernel,
            blur_sigma=self.sag_sigma,
            mask=self.sag_mask,
            mask_fraction=self.sag_fraction if self.sag_fraction is not None else 0.4,
            window=tuple(self.sag_window),
            blur=mean_pixel_blur if self.sag_average else None,
        )

    def pag_term(self, layers: str | Sequence[str] = "mid") -> PAG | None:
        """The :class:`PAG` term of this arm (None without PAG)."""
        return PAG(scale=self.pag_scale, layers=layers) if self.pag_scale != 0 else None

    def seg_term(self) -> SEG | None:
        """The :class:`SEG` term of this arm (None without SEG), at the engine's default layers."""
        if self.seg_scale == 0:
            return None
        return SEG(scale=self.seg_scale, sigma=math.inf if self.seg_sigma is None else self.seg_sigma)

    def tpg_term(self) -> TPG | None:
        """The :class:`TPG` term of this arm (None without TPG), at the engine's default blocks."""
        return TPG(scale=self.tpg_scale) if self.tpg_scale != 0 else None

    def slg_term(self) -> SLG | None:
        """The :class:`SLG` term of this arm (None without SLG), at the engine's default blocks."""
        return SLG(scale=self.slg_scale, window=tuple(self.slg_window)) if self.slg_scale != 0 else None

    @property
    def terms(self) -> frozenset[str]:
        """The guidance terms this arm runs (among :data:`TERMS`; "blur" is SAG with the global mask)."""
        on = {
            "cfg": self.cfg_scale is not None,
            "sag": self.uses_sag and self.sag_mask != "global",
            "blur": self.uses_sag and self.sag_mask == "global",
            "pag": self.pag_scale != 0,
            "seg": self.seg_scale != 0,
            "tpg": self.tpg_scale != 0,
            "slg": self.slg_scale != 0,
        }
        return frozenset(t for t, used in on.items() if used)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The guidance arguments of attnguide's pipelines (``pipe(**arm.pipeline_kwargs(), ...)``); the SEG,
        TPG and SLG keywords only where the arm uses the term."""
        kwargs = {
            "guidance_scale": self.guidance_scale,
            "sag_scale": self.sag_scale,
            "sag_mask": self.sag_mask,
            "sag_blur_sigma": self.sag_sigma,
            "sag_blur_kernel_size": self.sag_kernel,
            "sag_window": tuple(self.sag_window),
            "pag_scale": self.pag_scale,
        }
        if self.seg_scale != 0:
            sigma = math.inf if self.seg_sigma is None else self.seg_sigma
            kwargs.update(seg_scale=self.seg_scale, seg_sigma=sigma)
        if self.tpg_scale != 0:
            kwargs["tpg_scale"] = self.tpg_scale
        if self.slg_scale != 0:
            kwargs.update(slg_scale=self.slg_scale, slg_window=tuple(self.slg_window))
        return kwargs

    # ------------------------------------------------------------------ identity
    def canonical(self) -> Arm:
        """The same arm with unused options reset, so equal samplers get equal keys."""
        a = self
        if a.sag_scale == 0:
            a = replace(
                a,
                sag_mask="attention",
                sag_sigma=1.0,
                sag_kernel=9,
                sag_fraction=None,
                sag_average=False,
                sag_window=(0.0, 1.0),
            )
        elif a.sag_mask in ("attention", "global"):
            a = replace(a, sag_fraction=None)
        if a.sag_average:
            a = replace(a, sag_sigma=1.0, sag_kernel=9)
        if a.seg_scale == 0:
            a = replace(a, seg_sigma=None)
        if a.slg_scale == 0:
            a = replace(a, slg_window=SLG.window)
        return a

    @property
    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``u-sag0.75-random0.41``."""
        a = self.canonical()
        parts = ["c" if a.conditional else "u"]
        if a.cfg_scale is not None:
            parts.append(f"cfg{a.cfg_scale:g}")
        if a.sag_scale != 0:
            s = f"sag{a.sag_scale:g}"
            if a.sag_mask != "attention":
                s += f"-{a.sag_mask}"
            if a.sag_fraction is not None:
                s += f"{a.sag_fraction:.6g}"
            if a.sag_average:
                s += "-avgpixel"
            elif (a.sag_sigma, a.sag_kernel) != (1.0, 9):
                s += f"-sigma{a.sag_sigma:g}-k{a.sag_kernel}"
            if tuple(a.sag_window) != (0.0, 1.0):
                s += f"-win{a.sag_window[0]:g}-{a.sag_window[1]:g}"
            parts.append(s)
        if a.pag_scale != 0:
            parts.append(f"pag{a.pag_scale:g}")
        if a.seg_scale != 0:
            parts.append(f"seg{a.seg_scale:g}" + ("" if a.seg_sigma is None else f"-sigma{a.seg_sigma:g}"))
        if a.tpg_scale != 0:
            parts.append(f"tpg{a.tpg_scale:g}")
        if a.slg_scale != 0:
            s = f"slg{a.slg_scale:g}"
            if tuple(a.slg_window) != SLG.window:
                s += f"-win{a.slg_window[0]:g}-{a.slg_window[1]:g}"
            parts.append(s)
        if a.classifier_scale != 0:
            parts.append(f"cg{a.classifier_scale:g}")
        if a.steps_multiplier != 1:
            parts.append(f"{a.steps_multiplier}xsteps")
        return "-".join(parts)
