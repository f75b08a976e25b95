"""One ``Arm`` type for every application: a sampling configuration, that is, which guidance terms run
at which scales. The CLI's grid columns, the demo's methods, the evaluation's arms and the benchmark's
arms are all ``Arm`` values; :meth:`Arm.from_method` reads the method names they share.

Everything here is generated from the term registry (:data:`attnguide.engine.terms.REGISTRY`): each
term's :class:`~attnguide.engine.terms.AppParam` settings are ``Arm`` fields named ``<term>_<setting>``
(``sag_scale``, ``sag_sigma``, ``seg_sigma``, ``slg_window``, ...), each of its method names
(``sag``, ``blur``, ``pag``, ...) is a method of the applications, and its key part names the arm's
files. A new term needs no change here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ..engine.terms import REGISTRY, Term
from ..pipelines.options import KEYWORD_TERMS

__all__ = [
    "ALONE_METHODS",
    "ATTENTION_TERMS",
    "CONDITIONAL_METHODS",
    "METHODS",
    "METHOD_TERMS",
    "TERMS",
    "Arm",
    "method_scale",
    "method_terms",
]

#: Each method name of the applications -> (the term class, the settings it fixes): "blur" is SAG with
#: the global mask (the paper's Sec. 5.1).
METHOD_TERMS: dict[str, tuple[type[Term], dict[str, Any]]] = {
    method: (cls, fields) for cls in REGISTRY for method, fields in cls.methods().items()
}
#: The guidance terms that method names join: CFG and every method of the registry.
TERMS = ("cfg", *METHOD_TERMS)
#: The terms whose weak prediction acts on the model's attention or blocks (they need self-attention).
ATTENTION_TERMS = frozenset(METHOD_TERMS)
#: The methods that run without CFG (every method but those of the CFG rules, which need CFG).
ALONE_METHODS = tuple(m for m, (cls, _) in METHOD_TERMS.items() if not cls.app.needs_cfg)
#: The methods the applications list: none, each term alone (not a CFG rule), CFG alone and with each,
#: and SAG + PAG (any "+"-joined set of :data:`TERMS` is a method too).
METHODS = ("none", *ALONE_METHODS, "cfg", *(f"cfg+{m}" for m in METHOD_TERMS), "sag+pag")
#: Methods that need a conditional model (CFG).
CONDITIONAL_METHODS = frozenset(m for m in METHODS if "cfg" in m.split("+"))


def method_terms(method: str) -> frozenset[str]:
    """The terms of a method name ("cfg+sag" -> {"cfg", "sag"}); ValueError for an unknown name (a term
    not in :data:`TERMS`, one named twice, or two methods of the same term)."""
    parts = [] if method == "none" else method.split("+") if isinstance(method, str) else [None]
    owners = [METHOD_TERMS[p][0] for p in parts if p in METHOD_TERMS]
    if (not parts and method != "none") or any(p not in TERMS for p in parts) or len(set(parts)) < len(parts):
        raise ValueError(
            f"method must be one of {', '.join(METHODS)} (or terms joined by '+'), got {method!r}"
        )
    if len(set(owners)) < len(owners):
        raise ValueError(f"method {method!r} names one term twice ({', '.join(parts)})")
    rules = [p for p in parts if p in METHOD_TERMS and METHOD_TERMS[p][0].app.needs_cfg]
    if rules and "cfg" not in parts:
        raise ValueError(f"method {method!r}: {rules[0]} is a CFG rule; it needs CFG: cfg+{rules[0]}")
    if len(rules) > 1:
        raise ValueError(f"method {method!r} names two CFG rules ({', '.join(rules)}); a run takes one")
    return frozenset(parts)


def method_scale(method: str) -> float:
    """The scale a method runs at in the applications by default (its term's scale setting's
    ``app_default``; for the library's default see the term class)."""
    cls, _ = METHOD_TERMS[method]
    return cls.app.params[0].app_default


def _values(arm: Any, cls: type[Term]) -> dict[str, Any]:
    """An arm's settings of term ``cls``, by setting name."""
    return {p.name: getattr(arm, f"{cls.name}_{p.name}") for p in cls.app.params}


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class _ArmMethods:
    """The methods of :class:`Arm`."""

    def __post_init__(self) -> None:
        m = self.steps_multiplier
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"`steps_multiplier` must be a positive integer, got {m!r}")
        for cls in REGISTRY:
            for p in cls.app.params:
                value = getattr(self, f"{cls.name}_{p.name}")
                if (
                    p.inf_allowed
                    and value is not None
                    and not (isinstance(value, (int, float)) and value > 0)
                ):
                    raise ValueError(
                        f"`{cls.name}_{p.name}` must be a number > 0 or None (infinity), got {value!r}"
                    )

    @classmethod
    def from_method(cls, method: str, *, cfg_scale: float, **options: Any) -> Arm:
        """The arm of a method name ("cfg+sag", "blur", "seg", ...). ``options``: ``<method>_scale`` for the
        scale of each method it names (default: the term's library scale; "blur" defaults to
        ``sag_scale`` where given), and other ``Arm`` fields."""
        return cls.from_terms(method_terms(method), name=method, cfg_scale=cfg_scale, **options)

    @classmethod
    def from_terms(cls, terms: Iterable[str], *, name: str = "", cfg_scale: float, **options: Any) -> Arm:
        """Like :meth:`from_method` for any set of :data:`TERMS` (e.g. {"cfg", "sag", "pag"}); ValueError
        for an unknown term."""
        terms = frozenset(terms)
        if not terms <= set(TERMS):
            raise ValueError(f"terms must be among {', '.join(TERMS)}, got {sorted(terms - set(TERMS))}")
        scales = {m: options.pop(f"{m}_scale") for m in METHOD_TERMS if f"{m}_scale" in options}
        fields: dict[str, Any] = {}
        for cls_, _ in METHOD_TERMS.values():  # every term off unless a method names it
            fields[f"{cls_.name}_scale"] = 0.0
        for method in sorted(terms - {"cfg"}, key=list(METHOD_TERMS).index):
            term, fixed = METHOD_TERMS[method]
            scale = scales.get(method, scales.get(term.name))
            fields[f"{term.name}_scale"] = scale if scale is not None else _library_scale(term)
            fields.update({f"{term.name}_{k}": v for k, v in fixed.items()})
        return cls(name=name, cfg_scale=cfg_scale if "cfg" in terms else None, **{**options, **fields})

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
        """Whether SAG runs an ablation mask whose fraction is to be calibrated to the attention mask's."""
        ablation = self.sag_mask in ("random", "random_tokens", "square", "highfreq")
        return self.uses_sag and ablation and self.sag_fraction is None

    def engine_terms(self) -> dict[str, Term]:
        """The engine terms this arm runs, by name (at each term's default layers; classifier guidance is
        built by the evaluation's sampler, with the model's classifier)."""
        built = {cls.name: cls.from_app(_values(self, cls)) for cls in REGISTRY}
        return {name: term for name, term in built.items() if term is not None}

    def term(self, name: str) -> Term | None:
        """The engine term ``name`` of this arm (None when off)."""
        return self.engine_terms().get(name)

    @property
    def terms(self) -> frozenset[str]:
        """The method terms this arm runs (among :data:`TERMS`; "blur" is SAG with the global mask)."""
        on = {"cfg"} if self.cfg_scale is not None else set()
        for cls in REGISTRY:
            values = _values(self, cls)
            if values["scale"] == 0 or not cls.app.method:
                continue
            methods = {m: fixed for m, fixed in cls.methods().items() if m != cls.name}
            named = [m for m, fixed in methods.items() if all(values[k] == v for k, v in fixed.items())]
            on.add(named[0] if named else cls.name)
        return frozenset(on)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The guidance arguments of attnguide's pipelines (``pipe(**arm.pipeline_kwargs(), ...)``): each
        term the arm runs with the keywords its settings give, and 0 for the scale of each term that a
        pipeline may run by default (SAG's pipelines, the PAG drop-ins) when the arm does not."""
        kwargs: dict[str, Any] = {"guidance_scale": self.guidance_scale}
        terms = self.engine_terms()
        for cls in KEYWORD_TERMS:
            term = terms.get(cls.name)
            if term is None:
                if cls.default_on_in_pipelines:
                    kwargs[f"{cls.name}_scale"] = 0.0
                continue
            params = {p.field for p in cls.app.params if p.field is not None}
            kwargs.update({k: getattr(term, f.name) for k, f in cls.keywords().items() if f.name in params})
        return kwargs

    # ------------------------------------------------------------------ identity
    def canonical(self) -> Arm:
        """The same arm with unused options reset, so equal samplers get equal keys."""
        changes = {}
        for cls in REGISTRY:
            values = cls.app_canonical(_values(self, cls))
            changes.update({f"{cls.name}_{k}": v for k, v in values.items()})
        return dataclasses.replace(self, **changes)

    @property
    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``u-sag0.75-random0.41``."""
        a = self.canonical()
        parts = ["c" if a.conditional else "u"]
        if a.cfg_scale is not None:
            parts.append(f"cfg{a.cfg_scale:g}")
        parts += [p for p in (cls.app_key(_values(a, cls)) for cls in REGISTRY) if p]
        if a.steps_multiplier != 1:
            parts.append(f"{a.steps_multiplier}xsteps")
        return "-".join(parts)

    def settings(self) -> dict[str, Any]:
        """The arm's fields as JSON values (tuples as lists; ``name`` left out)."""
        return {f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "name"}


def _library_scale(cls: type[Term]) -> float:
    """The scale a term class defaults to in the library (its dataclass field's default)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == "scale")


def _arm_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    base = [
        ("name", str, dataclasses.field(default="", compare=False)),
        ("conditional", bool, dataclasses.field(default=False)),
        ("steps_multiplier", int, dataclasses.field(default=1)),
        ("cfg_scale", "float | None", dataclasses.field(default=None)),
    ]
    terms = [
        (f"{cls.name}_{p.name}", Any, dataclasses.field(default=p.default))
        for cls in REGISTRY
        for p in cls.app.params
    ]
    return base + terms


def _arm_doc() -> str:
    lines = [
        "One sampling configuration.",
        "",
        "``name``: a display name (not part of equality). ``conditional``: sample class labels (evaluation: "
        "``i mod 10``; else the null label). ``cfg_scale``: CFG weight w (None: no CFG). "
        "``steps_multiplier``: sample with that many times the sampling steps (the evaluation's sampler "
        "honours it), e.g. an unguided arm given as many model passes as a guided one (compute-matched). "
        "Then each term's settings (scale 0: the term is off), generated from the registry:",
    ]
    for cls in REGISTRY:
        names = ", ".join(f"``{cls.name}_{p.name}``" for p in cls.app.params)
        lines.append(f"{cls.title} ({cls.__name__}): {names}.")
    return "\n".join(lines)


Arm = dataclasses.make_dataclass(
    "Arm",
    _arm_fields(),
    bases=(_ArmMethods,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": _arm_doc()},
)
