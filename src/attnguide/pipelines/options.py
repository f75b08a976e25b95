"""The guidance keyword arguments of every attnguide pipeline, declared once, and the argument checks the
pipelines share. The guidance math itself is in :mod:`attnguide.engine.guidance`."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from diffusers.models.attention_processor import (
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)
from torch import nn

from ..engine.attention import model_lock, resolve_layers
from ..engine.guidance import PAG, SAG, check_scale
from .scheduler_fixups import only_fixups

_F = TypeVar("_F", bound=Callable[..., Any])

#: The guidance defaults of the PAG drop-ins that differ from :class:`GuidanceOptions`': no SAG unless asked.
PAG_PIPELINE_DEFAULTS: dict[str, Any] = {"sag_scale": 0.0}


@dataclass(frozen=True)
class GuidanceOptions:
    """The SAG / blur-guidance / PAG options a pipeline call takes (diffusers' names: ``sag_scale``,
    ``pag_scale``, ``pag_applied_layers``, ...). ``sag_*`` build a :class:`attnguide.SAG` term (scale 0:
    none; ``sag_mask="global"`` is blur guidance), ``pag_*`` a :class:`attnguide.PAG` term, and
    ``record_masks`` keeps the SAG masks in ``pipe.last_guider`` (``mask_sum``, ``last_mask``)."""

    sag_scale: float = 0.75
    sag_layers: str | list[str] | None = None
    sag_threshold: float = 1.0
    sag_blur_kernel_size: int = 9
    sag_blur_sigma: float = 1.0
    sag_mask: str = "attention"
    sag_window: tuple[float, float] = (0.0, 1.0)
    pag_scale: float = 0.0
    pag_adaptive_scale: float = 0.0
    pag_applied_layers: str | list[str] | None = None
    pag_window: tuple[float, float] = (0.0, 1.0)
    record_masks: bool = False

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

    def sag(self) -> SAG | None:
        """The SAG term (None when ``sag_scale`` is 0); ValueError naming the argument for bad values."""
        check_scale("sag_scale", self.sag_scale)
        if self.sag_scale == 0:
            return None
        return SAG(
            scale=self.sag_scale,
            layers=self.sag_layers,
            threshold=self.sag_threshold,
            blur_kernel_size=self.sag_blur_kernel_size,
            blur_sigma=self.sag_blur_sigma,
            mask=self.sag_mask,
            window=self.sag_window,
        )

    def pag(self) -> PAG | None:
        """The PAG term (None when ``pag_scale`` is 0 or no layer is named)."""
        check_scale("pag_scale", self.pag_scale)
        check_scale("pag_adaptive_scale", self.pag_adaptive_scale)
        layers = self.pag_applied_layers
        if self.pag_scale == 0 or (layers is not None and not isinstance(layers, str) and len(layers) == 0):
            return None
        return PAG(
            scale=self.pag_scale,
            adaptive_scale=self.pag_adaptive_scale,
            layers=layers,
            window=self.pag_window,
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


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def divisible_size(name: str, value: Any, factor: int, what: str = "") -> int:
    """``value`` if it is a positive int divisible by ``factor``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
        raise ValueError(f"`{name}` must be a positive integer divisible by {factor}{what}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> None:
    """None or a number in (0, 1], else ValueError naming ``name``."""
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 < value <= 1.0
    ):
        raise ValueError(f"`{name}` must be a fraction in (0, 1] or None, got {value!r}")


def init_with_pag_layers(
    base_init: Callable[..., None],
    like: Callable[..., None] | None = None,
    *,
    pag_attn_processors: tuple[Any, Any] | None = None,
    scheduler_fixups: Sequence[str] | None = None,
) -> Callable[..., None]:
    """An ``__init__`` that takes ``base_init``'s arguments plus ``pag_applied_layers``, as diffusers' PAG
    pipelines do. Its signature says so, which diffusers' loaders (``from_pretrained``, ``from_pipe``) read
    to know the components.

    ``like``: the ``__init__`` of the diffusers PAG pipeline replaced, whose signature (defaults included,
    such as its default ``pag_applied_layers``) is taken once it is checked to name the same arguments;
    without it the default layers are "mid". ``pag_attn_processors``: the pair that pipeline passes to
    ``set_pag_applied_layers`` where it is not diffusers' default. ``scheduler_fixups``: the scheduler
    fix-ups that pipeline makes where they differ from ``base_init``'s (:mod:`.scheduler_fixups`).
    """
    sig = inspect.signature(base_init)
    layers = inspect.Parameter("pag_applied_layers", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="mid")
    full = sig.replace(parameters=[*sig.parameters.values(), layers])
    # diffusers' from_pipe matches components by these type hints
    hints = {**get_type_hints(base_init), "pag_applied_layers": str | list[str]}
    if like is not None:
        theirs = inspect.signature(like)
        if list(theirs.parameters) != list(full.parameters):
            raise TypeError(
                f"{like.__qualname__} takes {list(theirs.parameters)}, not {base_init.__qualname__}'s "
                f"arguments plus pag_applied_layers ({list(full.parameters)})"
            )
        full = theirs
        hints.update(get_type_hints(like))
    processors = () if pag_attn_processors is None else (pag_attn_processors,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = full.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        pag_layers = arguments.pop("pag_applied_layers")
        fixing = contextlib.nullcontext()
        if scheduler_fixups is not None:
            fixing = only_fixups(arguments.get("scheduler"), scheduler_fixups)
        with fixing:
            base_init(self, **arguments)
        self.set_pag_applied_layers(pag_layers, *processors)

    __init__.__signature__ = full  # type: ignore[attr-defined]
    __init__.__annotations__ = hints
    __init__.__doc__ = f"{(like or base_init).__qualname__}'s arguments."
    return __init__


class PAGLayersMixin:
    """diffusers' PAG pipeline interface (``PAGMixin``): ``set_pag_applied_layers``, the properties that
    callbacks read (``pag_scale``, ``do_perturbed_attention_guidance``, ``pag_attn_processors``, ...) and
    ``_set_pag_attn_processor``, diffusers' hook that installs its PAG processors."""

    #: diffusers' default pair: identity attention for the perturbed rows with CFG and without it.
    DEFAULT_PAG_ATTN_PROCESSORS = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())

    pag_applied_layers: list[str]
    _pag_scale: float = 0.0
    _pag_adaptive_scale: float = 0.0
    _pag_attn_processors: tuple[Any, Any] | None = None
    # what _set_pag_attn_processor installed: layer path -> (the processor it replaced, the one installed)
    _pag_installed: dict[str, tuple[Any, Any]] | None = None

    def set_pag_applied_layers(
        self,
        pag_applied_layers: str | list[str],
        pag_attn_processors: tuple[Any, Any] | None = DEFAULT_PAG_ATTN_PROCESSORS,
    ) -> None:
        """Choose the PAG layers (paths or patterns, matched by attnguide.engine.attention.resolve_layers)
        and, as diffusers, the processor pair that :meth:`_set_pag_attn_processor` installs. attnguide's
        own calls perturb the layers themselves (identity attention) whichever pair is set."""
        layers = [pag_applied_layers] if isinstance(pag_applied_layers, str) else list(pag_applied_layers)
        if pag_attn_processors is not None and (
            not isinstance(pag_attn_processors, tuple) or len(pag_attn_processors) != 2
        ):
            raise ValueError("Expected a tuple of two attention processors")
        for layer in layers:
            if not isinstance(layer, str):
                raise ValueError(f"`pag_applied_layers` must be a string or a list of strings, got {layer!r}")
        self.pag_applied_layers = layers
        self._pag_attn_processors = pag_attn_processors

    def pag_options(self, call: dict[str, Any], kwargs: dict[str, Any]) -> GuidanceOptions:
        """The guidance options of a PAG pipeline call: ``pag_scale`` / ``pag_adaptive_scale`` taken from
        ``call`` (and kept for the properties), the rest from ``kwargs``; no SAG unless asked for."""
        self._pag_scale = call.pop("pag_scale")
        self._pag_adaptive_scale = call.pop("pag_adaptive_scale")
        return GuidanceOptions.take(
            kwargs,
            **PAG_PIPELINE_DEFAULTS,
            pag_scale=self._pag_scale,
            pag_adaptive_scale=self._pag_adaptive_scale,
            pag_applied_layers=self.pag_applied_layers,
        )

    def _pag_denoiser(self) -> nn.Module:
        model = getattr(self, "unet", None)
        if model is None:
            model = getattr(self, "transformer", None)
        if model is None:
            raise ValueError("No denoiser module found.")
        return model

    def _set_pag_attn_processor(
        self, pag_applied_layers: str | list[str], do_classifier_free_guidance: bool
    ) -> None:
        """diffusers' hook: install the pair's CFG (or no-CFG) processor on the self-attention layers that
        ``pag_applied_layers`` names. attnguide's calls do not need it, and run as if these were not
        installed (they are taken out for the call and put back after)."""
        if self._pag_attn_processors is None:
            raise ValueError(
                "No PAG attention processors have been set. Set the attention processors by calling "
                "`set_pag_applied_layers` and passing the relevant parameters."
            )
        processor = self._pag_attn_processors[0 if do_classifier_free_guidance else 1]
        model = self._pag_denoiser()
        layers = [pag_applied_layers] if isinstance(pag_applied_layers, str) else list(pag_applied_layers)
        if not layers:
            return
        modules = dict(model.named_modules())
        if self._pag_installed is None:
            self._pag_installed = {}
        for name in resolve_layers(model, layers, argument="pag_applied_layers"):
            module = modules[name]
            earlier = self._pag_installed.get(name)
            kept = earlier is not None and module.processor is earlier[1]
            self._pag_installed[name] = (earlier[0] if kept else module.processor, processor)
            module.processor = processor

    def run_guided(self, options: GuidanceOptions, call: dict[str, Any], extra: dict[str, Any]):
        """The guided call, with the processors :meth:`_set_pag_attn_processor` left installed replaced by
        the ones they replaced for its duration, so that they cannot change its result."""
        model = self._pag_denoiser() if self._pag_installed else None
        modules = dict(model.named_modules()) if model is not None else {}
        left = {
            name: pair
            for name, pair in (self._pag_installed or {}).items()
            if getattr(modules.get(name), "processor", None) is pair[1]
        }
        if not left:
            return super().run_guided(options, call, extra)  # type: ignore[misc]
        with model_lock(model):
            for name, (original, _) in left.items():
                modules[name].processor = original
            try:
                return super().run_guided(options, call, extra)  # type: ignore[misc]
            finally:
                for name, (_, processor) in left.items():
                    modules[name].processor = processor

    @property
    def pag_attn_processors(self) -> dict[str, Any]:
        """The PAG processors installed in the denoiser (those of the pair's classes), by processor path."""
        if self._pag_attn_processors is None:
            return {}
        classes = {type(p) for p in self._pag_attn_processors}
        return {k: p for k, p in self._pag_denoiser().attn_processors.items() if type(p) in classes}

    @property
    def pag_scale(self) -> float:
        return self._pag_scale

    @property
    def pag_adaptive_scale(self) -> float:
        return self._pag_adaptive_scale

    @property
    def do_pag_adaptive_scaling(self) -> bool:
        return self._pag_adaptive_scale > 0 and self._pag_scale > 0 and len(self.pag_applied_layers) > 0

    @property
    def do_perturbed_attention_guidance(self) -> bool:
        return self._pag_scale > 0 and len(self.pag_applied_layers) > 0
