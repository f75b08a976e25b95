"""The experiments of ``attnguide eval``: which arms each of the SAG paper's tables samples, and which arm
each one is compared with (paired: same seeds)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..arms import Arm

__all__ = [
    "COST_METHODS",
    "DEFAULT_SCALES",
    "DEFAULT_SIGMAS",
    "DEFAULT_WINDOWS",
    "EXPERIMENTS",
    "Entry",
    "blur_kernel_for",
    "build_experiments",
    "unique_arms",
]

EXPERIMENTS = ("table1", "scale", "masking", "sigma", "cfg", "window", "cost")
#: SAG step windows of the "window" experiment: (start, stop) as fractions of the sampling steps.
DEFAULT_WINDOWS = ((0.0, 0.5), (0.5, 1.0), (0.0, 0.25), (0.25, 1.0))
DEFAULT_SCALES = (-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.75, 1.0)
DEFAULT_SIGMAS = (1.0, 3.0, 9.0, 27.0)


@dataclass(frozen=True)
class Entry:
    """One row of an experiment: a display ``label``, its arm, a plot position ``x`` and the label of the
    arm it is compared with (paired) or None."""

    label: str
    arm: Arm
    x: float | None = None
    baseline: str | None = None


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


def _scale_sweep(scales: Sequence[float]) -> list[Entry]:
    return [
        Entry(f"s={s:g}", Arm(sag_scale=float(s)), x=float(s), baseline=None if s == 0 else "s=0")
        for s in sorted({float(s) for s in (*scales, 0.0)})
    ]


def _masking(u_sag: Arm) -> list[Entry]:
    rows = [Entry("baseline", Arm())]
    for label, mask in (
        ("global (blur guidance)", "global"),
        ("high-frequency", "highfreq"),
        ("random", "random"),
        ("square", "square"),
    ):
        rows.append(Entry(label, replace(u_sag, sag_mask=mask), baseline="baseline"))
    rows.append(Entry("self-attention (SAG)", u_sag, baseline="baseline"))
    return rows


def _sigma_sweep(u_sag: Arm, sigmas: Sequence[float], image_size: int) -> list[Entry]:
    base = "sigma->0 (baseline)"
    rows = [Entry(base, Arm(), x=0.0)]
    for s in sigmas:
        arm = replace(u_sag, sag_sigma=float(s), sag_kernel=blur_kernel_for(float(s), image_size))
        rows.append(Entry(f"sigma={s:g}", arm, x=float(s), baseline=base))
    rows.append(Entry("sigma->inf (avg pixel)", replace(u_sag, sag_average=True), x=math.inf, baseline=base))
    return rows


def _guidance_methods(u_sag: Arm, cfg_scale: float, pag_scale: float, conditional_model: bool) -> list[Entry]:
    rows = [
        Entry("uncond", Arm()),
        Entry("PAG", Arm(pag_scale=pag_scale), baseline="uncond"),
        Entry("SAG", u_sag, baseline="uncond"),
        Entry("SAG + PAG", replace(u_sag, pag_scale=pag_scale), baseline="uncond"),
    ]
    if conditional_model:
        cfg_arm = Arm(conditional=True, cfg_scale=cfg_scale)
        rows += [
            Entry("cond", Arm(conditional=True)),
            Entry("CFG", cfg_arm, baseline="cond"),
            Entry("CFG + SAG", replace(cfg_arm, sag_scale=u_sag.sag_scale), baseline="CFG"),
        ]
    return rows


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
) -> dict[str, list[Entry]]:
    """The entries of each named experiment (``cost`` has none: it samples nothing that is kept).

    Without a class-conditional model the conditional arms of ``table1`` and ``cfg`` are left out."""
    u_sag = Arm(sag_scale=sag_scale)
    builders: dict[str, Callable[[], list[Entry]]] = {
        "table1": lambda: _table1(u_sag, conditional_model),
        "scale": lambda: _scale_sweep(scales),
        "masking": lambda: _masking(u_sag),
        "sigma": lambda: _sigma_sweep(u_sag, sigmas, image_size),
        "cfg": lambda: _guidance_methods(u_sag, cfg_scale, pag_scale, conditional_model),
        "window": lambda: _step_windows(u_sag),
    }
    out: dict[str, list[Entry]] = {}
    for name in names:
        if name == "cost":
            continue
        if name not in builders:
            raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
        out[name] = builders[name]()
    return out


def unique_arms(experiments: dict[str, list[Entry]]) -> dict[str, Arm]:
    """Every distinct arm of ``experiments`` (canonical form) by key, in the order they first appear: each
    is sampled once even when several experiments list it."""
    arms: dict[str, Arm] = {}
    for rows in experiments.values():
        for e in rows:
            arms.setdefault(e.arm.key, e.arm.canonical())
    return arms


#: The methods the cost experiment times: name -> arm of (SAG scale s, CFG weight w, PAG scale p).
COST_METHODS: dict[str, Callable[[float, float, float], Arm]] = {
    "no guidance": lambda s, w, p: Arm(),
    "SAG": lambda s, w, p: Arm(sag_scale=s),
    "blur guidance": lambda s, w, p: Arm(sag_scale=s, sag_mask="global"),
    "PAG": lambda s, w, p: Arm(pag_scale=p),
    "SAG + PAG": lambda s, w, p: Arm(sag_scale=s, pag_scale=p),
    "CFG": lambda s, w, p: Arm(conditional=True, cfg_scale=w),
    "CFG + SAG": lambda s, w, p: Arm(conditional=True, cfg_scale=w, sag_scale=s),
}
