"""The experiments of ``attnguide eval``: which arms each of the SAG paper's tables samples, and which arm
each one is compared with (paired: same seeds)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ...engine.terms import REGISTRY, Term
from ..arms import Arm

__all__ = [
    "COST_METHODS",
    "DEFAULT_CLASSIFIER_SCALE",
    "DEFAULT_SAG_SIGMAS",
    "DEFAULT_SCALES",
    "DEFAULT_SIGMAS",
    "DEFAULT_WINDOWS",
    "EXPERIMENTS",
    "PASSES_MULTIPLIER",
    "ROW_TERMS",
    "Entry",
    "TermRows",
    "best_sigma",
    "blur_kernel_for",
    "build_experiments",
    "matched_sag_arms",
    "unique_arms",
    "with_matched_cfg",
]

EXPERIMENTS = ("table1", "scale", "masking", "sigma", "cfg", "table3", "window", "cost")
#: Classifier-guidance scale s of the "table3" arms (ADM's ``classifier_scale``; ADM's 128x128
#: conditional model, whose Table 3 row "CG" this reproduces, used 0.5).
DEFAULT_CLASSIFIER_SCALE = 0.5
#: SAG step windows of the "window" experiment: (start, stop) as fractions of the sampling steps.
DEFAULT_WINDOWS = ((0.0, 0.5), (0.5, 1.0), (0.0, 0.25), (0.25, 1.0))
#: SAG scales s of the "scale" sweep: the official ADM scripts' range (s = 0.1-0.2) and around it.
DEFAULT_SCALES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_SIGMAS = (1.0, 3.0, 9.0, 27.0)
#: Blur sigmas of the "scale" sweep and the "masking" experiment: 3, the setting of the paper's Table 5
#: (its SAG row is Table 6's sigma-3 row; the official 128 px scripts use sigma 3). Kernels: blur_kernel_for.
DEFAULT_SAG_SIGMAS = (3.0,)
#: The terms of the "cfg" experiment's generic rows (each alone against no guidance, and added to CFG
#: against CFG) and of the cost experiment: every term of the registry with an evaluation scale (SEG,
#: TPG, SLG: PAG's evaluation scale, 1.0, for each, so the rows compare the weak predictions at one
#: strength; SEG at sigma infinity, the mean query; SLG in every step: its SD3.5 window, steps 1-20 %,
#: holds one or two of a 10-20 step run). SAG and PAG have rows of their own.
ROW_TERMS: tuple[type[Term], ...] = tuple(cls for cls in REGISTRY if cls.app.eval_scale is not None)
#: Model passes per step of SAG over those of the unguided sampler (the batched pass and the degraded
#: one): the unguided compute-matched arm samples with this many times the steps.
PASSES_MULTIPLIER = 2


@dataclass(frozen=True)
class Entry:
    """One row of an experiment: a display ``label``, its arm, a plot position ``x`` and the label of the
    arm it is compared with (paired) or None.

    ``match_sag``: for a CFG arm whose weight the evaluation measures (compute-matched CFG), the SAG arm
    whose guidance strength it matches; its ``cfg_scale`` is None until :func:`with_matched_cfg` sets it.
    """

    label: str
    arm: Arm
    x: float | None = None
    baseline: str | None = None
    match_sag: Arm | None = None


@dataclass(frozen=True)
class TermRows:
    """The scales of the :data:`ROW_TERMS` in the evaluation's arms, by term name (0: the row is left
    out; missing: the term's evaluation scale), and their other settings (``Arm`` fields, e.g.
    ``seg_sigma``)."""

    scales: Mapping[str, float] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def scale(self, cls: type[Term]) -> float:
        return self.scales.get(cls.name, cls.app.eval_scale)

    def fields(self, cls: type[Term]) -> dict[str, Any]:
        """The ``Arm`` fields of term ``cls`` in the evaluation."""
        mine = {k: v for k, v in self.options.items() if k.startswith(f"{cls.name}_")}
        fixed = {f"{cls.name}_{k}": v for k, v in cls.app.eval_options.items()}
        return {f"{cls.name}_scale": self.scale(cls), **fixed, **mine}

    def arms(self, base: Arm) -> list[tuple[str, Arm]]:
        """(label, arm) of each term used, added to ``base``: "SEG", "TPG", "SLG", ...; the CFG rules
        only where ``base`` has CFG."""
        return [
            (cls.title, replace(base, **self.fields(cls)))
            for cls in ROW_TERMS
            if self.scale(cls) and (base.cfg_scale is not None or not cls.app.needs_cfg)
        ]


def blur_kernel_for(sigma: float, size: int) -> int:
    """An odd kernel covering +-3 sigma (at least 9, SAG's default), capped so that reflect padding stays
    valid on a ``size``-pixel side (kernel // 2 < size)."""
    k = max(9, 2 * math.ceil(3 * sigma) + 1)
    return min(k, 2 * size - 1)


def _table1(u_sag: Arm, conditional_model: bool) -> list[Entry]:
    rows = [Entry("uncond", Arm()), Entry("uncond + SAG", u_sag, baseline="uncond")]
    if conditional_model:
        rows += [
            Entry("cond", Arm(conditional=True)),
            Entry("cond + SAG", replace(u_sag, conditional=True), baseline="cond"),
        ]
    return rows


def _with_sigma(arm: Arm, sigma: float, image_size: int) -> Arm:
    """``arm`` with the Gaussian blur of ``sigma`` and its kernel (:func:`blur_kernel_for`)."""
    return replace(arm, sag_sigma=float(sigma), sag_kernel=blur_kernel_for(float(sigma), image_size))


def _sigma_suffix(sigma: float, sigmas: Sequence[float]) -> str:
    """The label suffix that tells a row's blur sigma apart, where an experiment runs at several."""
    return f", sigma={sigma:g}" if len(sigmas) > 1 else ""


def _scale_sweep(scales: Sequence[float], sigmas: Sequence[float], image_size: int) -> list[Entry]:
    """Each scale at each blur sigma, sorted by s within a sigma; s = 0 (no guidance) is the baseline of
    all, placed among the first sigma's rows."""
    rows, nonzero = [], {float(s) for s in scales} - {0.0}
    for i, sigma in enumerate(sigmas):
        for s in sorted(nonzero | {0.0} if i == 0 else nonzero):
            if s == 0:
                rows.append(Entry("s=0", Arm(), x=0.0))
                continue
            arm = _with_sigma(Arm(sag_scale=s), sigma, image_size)
            rows.append(Entry(f"s={s:g}{_sigma_suffix(sigma, sigmas)}", arm, x=s, baseline="s=0"))
    return rows


def _masking(u_sag: Arm, sigmas: Sequence[float], image_size: int) -> list[Entry]:
    """Table 5's masks (and random whole attention tokens) at each blur sigma, against no guidance."""
    rows = [Entry("baseline", Arm())]
    for sigma in sigmas:
        sag, suffix = _with_sigma(u_sag, sigma, image_size), _sigma_suffix(sigma, sigmas)
        for label, mask in (
            ("global (blur guidance)", "global"),
            ("high-frequency", "highfreq"),
            ("random", "random"),
            ("random (token blocks)", "random_tokens"),
            ("square", "square"),
            ("self-attention (SAG)", "attention"),
        ):
            rows.append(Entry(label + suffix, replace(sag, sag_mask=mask), baseline="baseline"))
    return rows


def _sigma_sweep(u_sag: Arm, sigmas: Sequence[float], image_size: int) -> list[Entry]:
    base = "sigma->0 (baseline)"
    rows = [Entry(base, Arm(), x=0.0)]
    for s in sigmas:
        arm = replace(u_sag, sag_sigma=float(s), sag_kernel=blur_kernel_for(float(s), image_size))
        rows.append(Entry(f"sigma={s:g}", arm, x=float(s), baseline=base))
    rows.append(Entry("sigma->inf (avg pixel)", replace(u_sag, sag_average=True), x=math.inf, baseline=base))
    return rows


def _guidance_methods(
    u_sag: Arm, cfg_scale: float, pag_scale: float, weak: TermRows, conditional_model: bool
) -> list[Entry]:
    """SAG beside the rest of the family (PAG, SEG, TPG, SLG) against no guidance, and each added to CFG
    against CFG alone."""
    rows = [
        Entry("uncond", Arm()),
        Entry("PAG", Arm(pag_scale=pag_scale), baseline="uncond"),
        Entry("SAG", u_sag, baseline="uncond"),
        Entry("SAG + PAG", replace(u_sag, pag_scale=pag_scale), baseline="uncond"),
        *(Entry(label, arm, baseline="uncond") for label, arm in weak.arms(Arm())),
    ]
    if conditional_model:
        cfg_arm = Arm(conditional=True, cfg_scale=cfg_scale)
        rows += [
            Entry("cond", Arm(conditional=True)),
            Entry("CFG", cfg_arm, baseline="cond"),
            Entry("CFG + SAG", replace(cfg_arm, sag_scale=u_sag.sag_scale), baseline="CFG"),
            *(Entry(f"CFG + {label}", arm, baseline="CFG") for label, arm in weak.arms(cfg_arm)),
        ]
    return rows


def _compute_matched(u_sag: Arm, cfg_scale: float, conditional_model: bool) -> list[Entry]:
    """SAG's compute-matched rivals (rows of the "cfg" experiment): the unguided sampler given SAG's model
    passes (:data:`PASSES_MULTIPLIER` times the steps) and, on a class-conditional model, CFG at the
    weight whose update is as strong as SAG's (measured by the evaluation; :func:`with_matched_cfg`). Each
    SAG arm is listed again with its rival as baseline, so the paired comparison says whether SAG wins.

    Without CFG the rival of "cond + SAG" (c + s (c - c_deg), two passes a step) is c + (w - 1) (c - u),
    two passes too; with CFG, "CFG + SAG" meets CFG at w + the strength ratio (one pass fewer)."""
    m = PASSES_MULTIPLIER
    u_steps, c_steps = f"uncond, {m}x steps", f"cond, {m}x steps"
    rows = [
        Entry(u_steps, Arm(steps_multiplier=m), baseline="uncond"),
        Entry(f"SAG vs {u_steps}", u_sag, baseline=u_steps),
    ]
    if conditional_model:
        c_sag = replace(u_sag, conditional=True)
        cfg_sag = replace(Arm(conditional=True, cfg_scale=cfg_scale), sag_scale=u_sag.sag_scale)
        to_measure = Arm(conditional=True)  # cfg_scale None until the evaluation measures the weight
        rows += [
            Entry("cond + SAG", c_sag, baseline="cond"),
            Entry(c_steps, Arm(conditional=True, steps_multiplier=m), baseline="cond"),
            Entry(f"cond + SAG vs {c_steps}", c_sag, baseline=c_steps),
            Entry("CFG matched to cond + SAG", to_measure, baseline="cond", match_sag=c_sag),
            Entry("cond + SAG vs matched CFG", c_sag, baseline="CFG matched to cond + SAG"),
            Entry("CFG matched to CFG + SAG", to_measure, baseline="CFG", match_sag=cfg_sag),
            Entry("CFG + SAG vs matched CFG", cfg_sag, baseline="CFG matched to CFG + SAG"),
        ]
    return rows


def _table3(u_sag: Arm, classifier_scale: float) -> list[Entry]:
    """Paper Table 3: classifier guidance (CG) with and without SAG on the class-conditional model, each
    guided arm paired with the arm it adds a term to (CG + SAG with CG, as the paper's last two rows)."""
    cond, c_sag = Arm(conditional=True), replace(u_sag, conditional=True)
    cg = replace(cond, classifier_scale=classifier_scale)
    return [
        Entry("cond", cond),
        Entry("cond + CG", cg, baseline="cond"),
        Entry("cond + SAG", c_sag, baseline="cond"),
        Entry("cond + CG + SAG", replace(c_sag, classifier_scale=classifier_scale), baseline="cond + CG"),
    ]


def _step_windows(u_sag: Arm) -> list[Entry]:
    rows = [Entry("no SAG", Arm()), Entry("SAG, all steps", u_sag, x=1.0, baseline="no SAG")]
    for w in DEFAULT_WINDOWS:
        label = f"SAG, steps {w[0]:g}-{w[1]:g}"
        rows.append(Entry(label, replace(u_sag, sag_window=w), x=w[1] - w[0], baseline="no SAG"))
    return rows


def build_experiments(
    names: Sequence[str],
    *,
    sag_scale: float,
    cfg_scale: float,
    pag_scale: float,
    scales: Sequence[float],
    sigmas: Sequence[float],
    image_size: int,
    conditional_model: bool = True,
    sag_sigmas: Sequence[float] = DEFAULT_SAG_SIGMAS,
    classifier_scale: float = DEFAULT_CLASSIFIER_SCALE,
    weak: TermRows = TermRows(),
) -> dict[str, list[Entry]]:
    """The entries of each named experiment (``cost`` has none: it samples nothing that is kept).

    ``sag_sigmas``: the blur sigmas of the ``scale`` sweep and the ``masking`` experiment (default the
    paper's Table 5 setting, 3; e.g. also the best sigma of an earlier ``sigma`` run, :func:`best_sigma`),
    each with the kernel of :func:`blur_kernel_for`. Without a class-conditional model the conditional
    arms of ``table1`` and ``cfg`` are left out, and ``table3`` (classifier guidance at
    ``classifier_scale``, towards the conditional arms' labels) is skipped. The ``cfg`` experiment's
    compute-matched CFG arms need their weight measured (:func:`with_matched_cfg`) before sampling; its
    rows of the other terms (:data:`ROW_TERMS`) take their scales from ``weak``."""
    sag_sigmas = tuple(dict.fromkeys(float(s) for s in sag_sigmas))
    if not sag_sigmas or not all(math.isfinite(s) and s > 0 for s in sag_sigmas):
        raise ValueError(f"`sag_sigmas` must be one or more positive finite numbers, got {sag_sigmas!r}")
    u_sag = Arm(sag_scale=sag_scale)
    builders: dict[str, Callable[[], list[Entry]]] = {
        "table1": lambda: _table1(u_sag, conditional_model),
        "scale": lambda: _scale_sweep(scales, sag_sigmas, image_size),
        "masking": lambda: _masking(u_sag, sag_sigmas, image_size),
        "sigma": lambda: _sigma_sweep(u_sag, sigmas, image_size),
        "cfg": lambda: (
            _guidance_methods(u_sag, cfg_scale, pag_scale, weak, conditional_model)
            + _compute_matched(u_sag, cfg_scale, conditional_model)
        ),
        "window": lambda: _step_windows(u_sag),
        "table3": lambda: _table3(u_sag, classifier_scale),
    }
    out: dict[str, list[Entry]] = {}
    for name in names:
        if name == "cost" or (name == "table3" and not conditional_model):
            continue
        if name not in builders:
            raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
        out[name] = builders[name]()
    return out


def unique_arms(experiments: dict[str, list[Entry]]) -> dict[str, Arm]:
    """Every distinct arm of ``experiments`` (canonical form) by key, in the order they first appear: each
    is sampled once even when several experiments list it. ValueError for a compute-matched CFG arm
    whose weight is not measured yet (:func:`with_matched_cfg`)."""
    arms: dict[str, Arm] = {}
    for rows in experiments.values():
        for e in rows:
            if e.match_sag is not None and e.arm.cfg_scale is None:
                raise ValueError(
                    f"`experiments`: {e.label!r} is CFG matched to {e.match_sag.key}, whose weight is not "
                    "measured yet (with_matched_cfg)"
                )
            arms.setdefault(e.arm.key, e.arm.canonical())
    return arms


def matched_sag_arms(experiments: dict[str, list[Entry]]) -> dict[str, Arm]:
    """The SAG arms (canonical, by key) whose guidance strength a compute-matched CFG arm must match."""
    return {
        e.match_sag.key: e.match_sag.canonical()
        for rows in experiments.values()
        for e in rows
        if e.match_sag is not None
    }


def with_matched_cfg(
    experiments: dict[str, list[Entry]], weights: dict[str, float]
) -> dict[str, list[Entry]]:
    """``experiments`` with each compute-matched CFG arm at its measured weight: ``weights`` maps the key
    of the SAG arm it matches (:func:`matched_sag_arms`) to the CFG weight w."""
    missing = sorted(set(matched_sag_arms(experiments)) - set(weights))
    if missing:
        raise ValueError(f"`weights` has no CFG weight for the SAG arm(s) {', '.join(missing)}")
    return {
        name: [
            replace(e, arm=replace(e.arm, cfg_scale=float(weights[e.match_sag.key])))
            if e.match_sag is not None
            else e
            for e in rows
        ]
        for name, rows in experiments.items()
    }


def best_sigma(results: dict[str, Any]) -> float:
    """The blur sigma of the lowest-FID SAG row of the ``sigma`` experiment in a results record
    (``metrics.json`` of an earlier run): the second-pass sigma of the scale and masking experiments.
    Only finite sigmas compete (not "sigma->inf"). ValueError where the record has no such rows."""
    block = results.get("experiments", {}).get("sigma", {}) if isinstance(results, dict) else {}
    scored = []
    for r in block.get("rows", []) if isinstance(block, dict) else []:
        spec, fid = r.get("spec") or {}, (r.get("metrics") or {}).get("fid")
        usable = r.get("uses_sag") and not spec.get("sag_average") and isinstance(fid, (int, float))
        if usable and math.isfinite(fid) and isinstance(spec.get("sag_sigma"), (int, float)):
            scored.append((fid, spec["sag_sigma"]))
    if not scored:
        raise ValueError("`results`: the record has no scored SAG rows of the sigma experiment")
    return float(min(scored)[1])


#: The methods the cost experiment times: name -> arm of the scales (keys "sag", "cfg", "pag" and each of
#: the :data:`ROW_TERMS`' names; those in every step, as the "cfg" experiment's arms).
COST_METHODS: dict[str, Callable[[dict[str, float]], Arm]] = {
    "no guidance": lambda k: Arm(),
    "SAG": lambda k: Arm(sag_scale=k["sag"]),
    "blur guidance": lambda k: Arm(sag_scale=k["sag"], sag_mask="global"),
    "PAG": lambda k: Arm(pag_scale=k["pag"]),
    **{
        cls.title: lambda k, cls=cls: replace(Arm(), **TermRows(scales={cls.name: k[cls.name]}).fields(cls))
        for cls in ROW_TERMS
        if not cls.app.needs_cfg
    },
    "SAG + PAG": lambda k: Arm(sag_scale=k["sag"], pag_scale=k["pag"]),
    "CFG": lambda k: Arm(conditional=True, cfg_scale=k["cfg"]),
    "CFG + SAG": lambda k: Arm(conditional=True, cfg_scale=k["cfg"], sag_scale=k["sag"]),
    **{
        f"CFG + {cls.title}": lambda k, cls=cls: replace(
            Arm(conditional=True, cfg_scale=k["cfg"]), **TermRows(scales={cls.name: k[cls.name]}).fields(cls)
        )
        for cls in ROW_TERMS
        if cls.app.needs_cfg
    },
}
