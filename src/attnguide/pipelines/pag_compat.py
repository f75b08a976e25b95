"""Compatibility with diffusers' PAG pipelines: their constructor (``pag_applied_layers``), their
``PAGMixin`` interface (``set_pag_applied_layers``, the properties callbacks read, the hook that installs
their processors), and :func:`pag_dropin`, the one helper that builds each drop-in PAG class from the
diffusers pipeline whose loop it runs and the diffusers PAG pipeline it replaces."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, get_type_hints

import torch
from diffusers.models.attention_processor import (
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)
from torch import nn

from ..engine.attention import model_lock
from ..engine.layers import resolve_layers
from ._guided import GuidedPipelineMixin, bind_arguments
from .options import GuidanceOptions, with_guidance_options
from .scheduler_fixups import only_fixups

__all__ = ["PAG_PIPELINE_DEFAULTS", "PAGLayersMixin", "init_with_pag_layers", "pag_dropin"]

#: The guidance defaults of the PAG drop-ins that differ from :class:`GuidanceOptions`': no SAG unless asked.
PAG_PIPELINE_DEFAULTS: dict[str, Any] = {"sag_scale": 0.0}


def init_with_pag_layers(
    base_init: Callable[..., None],
    like: Callable[..., None] | None = None,
    *,
    pag_attn_processors: tuple[Any, Any] | None = None,
    scheduler_fixups: Sequence[str] | None = None,
    default_layers: str | list[str] = "mid",
) -> Callable[..., None]:
    """An ``__init__`` that takes ``base_init``'s arguments plus ``pag_applied_layers``, as diffusers' PAG
    pipelines do. Its signature says so, which diffusers' loaders (``from_pretrained``, ``from_pipe``) read
    to know the components.

    ``like``: the ``__init__`` of the diffusers PAG pipeline replaced, whose signature (defaults included,
    such as its default ``pag_applied_layers``) is taken once it is checked to name the same arguments;
    without it the default layers are ``default_layers``. ``pag_attn_processors``: the pair that
    pipeline passes to ``set_pag_applied_layers`` where it is not diffusers' default.
    ``scheduler_fixups``: the scheduler fix-ups that pipeline makes where they differ from
    ``base_init``'s (:mod:`.scheduler_fixups`).
    """
    sig = inspect.signature(base_init)
    layers = inspect.Parameter(
        "pag_applied_layers", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default_layers
    )
    full = sig.replace(parameters=[*sig.parameters.values(), layers])
    # diffusers' from_pipe matches components by these type hints
    hints = {**get_type_hints(base_init), "pag_applied_layers": str | list[str]}
    if like is not None:
        theirs = inspect.signature(like)
        # optional components of the base that diffusers' PAG class does not name (SD3: image_encoder)
        # stay, keyword-only after its arguments: the base registers them, and positions stay diffusers'
        extra = [p for p in sig.parameters.values() if p.name not in theirs.parameters]
        names = [n for n in full.parameters if n not in {p.name for p in extra}]
        if list(theirs.parameters) != names or any(p.default is inspect.Parameter.empty for p in extra):
            raise TypeError(
                f"{like.__qualname__} takes {list(theirs.parameters)}, not {base_init.__qualname__}'s "
                f"arguments plus pag_applied_layers ({list(full.parameters)})"
            )
        kw_only = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
        full = theirs.replace(parameters=[*theirs.parameters.values(), *kw_only])
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


def pag_dropin(
    base: type,
    theirs: type,
    *,
    mixins: tuple[type, ...] = (),
    init: Callable[..., None] | None = None,
    like: bool = True,
    **init_options: Any,
) -> type:
    """The base class of the drop-in successor of diffusers' PAG pipeline ``theirs``: diffusers' pipeline
    ``base`` (whose loop runs inside :func:`attnguide.guide`) with ``theirs``' constructor
    (``pag_applied_layers``; :func:`init_with_pag_layers` of ``init`` or ``base.__init__``, taking
    ``theirs``' signature where ``like``; ``init_options`` go to it) and ``theirs``' ``__call__``
    arguments followed by the keyword-only :class:`GuidanceOptions`; ``mixins`` come before ``base``.
    A drop-in subclasses it with its name and docstring, and may override :meth:`adapt_call` (the call's
    arguments before they reach ``base``'s ``__call__``)."""
    signature = inspect.signature(theirs.__call__)

    @torch.no_grad()
    @with_guidance_options(base=theirs.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        call = self.adapt_call(bind_arguments(signature, args, kwargs))
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)

    __call__.__doc__ = (
        f"diffusers' ``{theirs.__name__}.__call__`` arguments (same defaults and meaning), then the "
        "keyword-only :class:`attnguide.pipelines.options.GuidanceOptions` (SAG beside PAG, the other "
        "terms, step windows, ``record_masks``)."
    )
    guided = () if issubclass(base, GuidedPipelineMixin) else (GuidedPipelineMixin,)
    namespace = {
        "__doc__": f"diffusers' ``{base.__name__}`` run with the arguments of ``{theirs.__name__}``.",
        "__module__": __name__,
        "__init__": init_with_pag_layers(
            init or base.__init__, theirs.__init__ if like else None, **init_options
        ),
        "__call__": __call__,
        "adapt_call": lambda self, call: call,
    }
    if hasattr(theirs, "_callback_tensor_inputs"):
        namespace["_callback_tensor_inputs"] = theirs._callback_tensor_inputs
    if like:  # diffusers' components: the base's extra optional modules (SD3's image encoder) are not
        namespace["_optional_components"] = list(theirs._optional_components)
    return type(f"_{theirs.__name__}Base", (PAGLayersMixin, *mixins, *guided, base), namespace)
