"""The applications' settings in one place: ``attnguide sample`` and the demo take their defaults and
ranges from here and from the term registry (each term's :class:`~attnguide.engine.terms.AppParam`), and
README's defaults table is generated from both (:func:`defaults_table`; ``tests/test_defaults.py`` keeps
README equal to it). The library's own defaults are the term classes' (``SAG()``, ``PAG()``, ...) and, for
the run settings, the pipeline's."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..engine.terms import REGISTRY, AppParam, Term
from .arms import METHOD_TERMS

__all__ = [
    "CFG_DEFAULT",
    "CFG_RANGE",
    "DEMO_MAX_IMAGES",
    "MAX_IMAGES",
    "NUM_IMAGES",
    "SCHEDULER",
    "SEED",
    "STEPS",
    "defaults_table",
    "term_flags",
]

#: The CFG weight of the cfg columns: the range offered and the default (w = 3 distorts the bundled
#: model's samples).
CFG_RANGE, CFG_DEFAULT = (0.0, 100.0), 1.5
#: The sampler of the applications: DPM-Solver++ (2M) at 20 steps, the evaluation protocol's sampler
#: (docs/evaluation.md); DDIM at 50 steps over-saturates the bundled model's samples from w = 3 on.
SCHEDULER, STEPS = "dpm", 20
SEED = 0
#: Rows of the grid (one per class of the bundled model); the demo shows at most DEMO_MAX_IMAGES.
NUM_IMAGES, MAX_IMAGES, DEMO_MAX_IMAGES = 10, 1024, 16


def term_flags() -> list[tuple[str, str, AppParam, str | None]]:
    """``(flag, dest, setting, Arm field)`` of every registered setting that ``attnguide sample`` offers:
    a scale per method (``--sag-scale``, ``--blur-scale``, ``--pag-scale``, ...; its Arm field is the
    method's, None here) and each term's other flagged settings (``--blur-sigma``, ``--seg-sigma``)."""
    out = []
    for method, (cls, _) in METHOD_TERMS.items():
        scale = cls.app.params[0]
        if scale.flag:
            out.append((f"--{method}-scale", f"{method}_scale", scale, None))
    for cls in REGISTRY:
        for p in cls.app.params[1:]:
            if p.flag:
                out.append((p.flag, p.flag[2:].replace("-", "_"), p, f"{cls.name}_{p.name}"))
    return out


def _library_default(cls: type[Term], p: AppParam) -> Any:
    """The term class's own default of the setting ``p`` (what ``SAG()``, ``PAG()`` ... use; None where
    the class has no such field or no default)."""
    field = {f.name: f for f in dataclasses.fields(cls)}.get(p.field or "")  # type: ignore[arg-type]
    return None if field is None or field.default is dataclasses.MISSING else field.default


def _shown(value: Any) -> str:
    return "inf" if value == math.inf else f"{value:g}" if isinstance(value, float) else str(value)


def defaults_table() -> str:
    """README's table of defaults: every setting of ``attnguide sample`` (the demo has the same defaults
    and ranges), the library's default where it has one, the range allowed and why the two differ."""
    rows = [
        _row("setting", "`attnguide sample` and demo", "library", "allowed", "why they differ"),
        "|---|---|---|---|---|",
    ]
    for flag, dest, p, arm_field in term_flags():
        cls = METHOD_TERMS[dest.removesuffix("_scale")][0] if arm_field is None else _owner(p)
        library = _library_default(cls, p)
        lib = f"{_shown(library)} (`{cls.__name__}()`)" if library is not None else "-"
        rows.append(_row(f"`{flag}`", _shown(p.app_default), lib, p.allowed(), p.why))
    rows += [
        _row(
            "`--cfg-scale`",
            _shown(CFG_DEFAULT),
            "the pipeline's",
            f"a number in [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}]",
            "w = 3 distorts the bundled model's samples",
        ),
        _row("`--steps`", str(STEPS), "the pipeline's", "1 to the scheduler's training steps", ""),
        _row("`--scheduler`", SCHEDULER, "the pipeline's", ", ".join(_scheduler_names()), ""),
        _row("`--num-images`", str(NUM_IMAGES), "-", f"1 to {MAX_IMAGES} (demo: 1 to {DEMO_MAX_IMAGES})", ""),
        _row("`--seed`", str(SEED), "-", "an integer (demo: 0 to 2^32 - 1)", ""),
    ]
    return "\n".join(rows)


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _owner(p: AppParam) -> type[Term]:
    return next(cls for cls in REGISTRY if any(q is p for q in cls.app.params))


def _scheduler_names() -> list[str]:
    from ..pipelines.schedulers import SCHEDULER_NAMES

    return sorted(SCHEDULER_NAMES)
