"""The guidance keyword arguments of every attnguide pipeline, generated from the term registry.

Each registered term (:data:`attnguide.engine.terms.REGISTRY`) whose settings can all be keywords gives
its dataclass fields as ``<term>_<field>`` keywords (``sag_scale``, ``sag_blur_sigma``, ``seg_sigma``,
...; a field may name its own, as PAG's ``pag_applied_layers``), with the term's defaults, except the
scale, which is off (0) unless the term says otherwise (SAG's pipelines sample with SAG at 0.75). A new
term is a new set of keywords here with no change to this module. The guidance math is in
:mod:`attnguide.engine.terms`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..engine.checks import check_scale
from ..engine.terms import REGISTRY, Term

__all__ = ["KEYWORD_TERMS", "GuidanceOptions", "reject_unknown", "with_guidance_options"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _keyword_term(cls: type[Term]) -> bool:
    """Whether every setting ``cls`` needs can be a keyword (classifier guidance needs a function)."""
    needed = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    return all(f.metadata.get("keyword", "") is not None for f in needed)


#: The terms the pipelines take as keywords, in registry order.
KEYWORD_TERMS: tuple[type[Term], ...] = tuple(cls for cls in REGISTRY if _keyword_term(cls))


def _option_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    fields = []
    for cls in KEYWORD_TERMS:
        for kw, f in cls.keywords().items():
            default = cls.pipeline_scale if f.name == "scale" else f.default
            fields.append((kw, f.type, dataclasses.field(default=default)))
    return [*fields, ("record_masks", bool, dataclasses.field(default=False))]


class _Options:
    """The methods of :class:`GuidanceOptions`."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def take(cls, kwargs: dict[str, Any], **defaults: Any) -> GuidanceOptions:
        """The options in ``kwargs`` (removed from it), the others from ``defaults`` or the class."""
        names = set(cls.names())
        unknown = set(defaults) - names
        if unknown:
            raise TypeError(f"not guidance options: {sorted(unknown)}")
        return cls(**{**defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in names}})

    def terms(self) -> dict[str, Term]:
        """The terms these options turn on (scale not 0, and not an empty list of layers), by the keyword
        ``attnguide.guide`` takes; ValueError naming the argument for bad values, also when a term is off."""
        values = dataclasses.asdict(self)
        out = {}
        for cls in KEYWORD_TERMS:
            check_scale(f"{cls.name}_scale", values[f"{cls.name}_scale"])
            term = cls.from_keywords(values)
            layers = getattr(term, "layers", None)
            no_layers = layers is not None and not isinstance(layers, (str, int)) and len(layers) == 0
            if term.scale != 0 and not no_layers:
                out[cls.name] = term
        return out

    def scales(self) -> dict[str, float]:
        """The guidance scales by name (what a non-finite output is blamed on)."""
        return {f"{cls.name}_scale": getattr(self, f"{cls.name}_scale") for cls in KEYWORD_TERMS}

    def check(self) -> dict[str, Term]:
        """:meth:`terms`, every option checked (``record_masks`` included)."""
        if not isinstance(self.record_masks, bool):
            raise ValueError(f"`record_masks` must be True or False, got {self.record_masks!r}")
        return self.terms()


GuidanceOptions = dataclasses.make_dataclass(
    "GuidanceOptions",
    _option_fields(),
    bases=(_Options,),
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "The guidance options a pipeline call takes, one keyword per setting of each term of "
        "the registry (diffusers' names: ``sag_scale``, ``pag_scale``, ``pag_applied_layers``, ...; "
        "``sag_mask='global'`` is blur guidance), and ``record_masks`` (keep the SAG masks in "
        "``pipe.last_guider``: ``mask_sum``, ``last_mask``). Generated from "
        ":data:`attnguide.engine.terms.REGISTRY`: "
        + ", ".join(f"``{f[0]}``" for f in _option_fields())
        + ".",
    },
)


def with_guidance_options(base: Callable | None = None, **defaults: Any) -> Callable[[_F], _F]:
    """Declare the :class:`GuidanceOptions` keywords on a ``__call__(self, ..., **guidance)``: its
    signature (``help()``, IDEs, ``inspect``) lists them as keyword-only arguments with ``defaults``
    (per pipeline: a PAG pipeline's ``sag_scale`` is 0), after the ones the function names itself, or
    after those of ``base`` (a diffusers ``__call__`` whose arguments the function takes as they are)."""

    def decorate(fn: _F) -> _F:
        sig = inspect.signature(base if base is not None else fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        own = {p.name for p in params}
        extra = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(f.name, f.default))
            for f in dataclasses.fields(GuidanceOptions)
            if f.name not in own
        ]
        fn.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
        return fn

    return decorate


def reject_unknown(kwargs: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    """TypeError like Python's for keyword arguments that ``where`` does not take."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s): {', '.join(map(repr, unknown))}")
