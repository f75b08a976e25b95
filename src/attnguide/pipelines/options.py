"""The guidance keyword arguments of every attnguide pipeline, declared once, and the argument checks the
pipelines share. The guidance math itself is in :mod:`attnguide.engine.guidance`."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

import torch
from diffusers.models.attention_processor import (
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)
from torch import Tensor, nn

from ..engine.attention import model_lock, resolve_layers
from ..engine.checks import (
    check_eta,
    check_generators,
    check_latents,
    check_schedule,
    check_steps,
    positive_int,
)
from ..engine.guidance import PAG, SAG, SEG, SLG, TPG, check_scale
from .scheduler_fixups import only_fixups

_F = TypeVar("_F", bound=Callable[..., Any])

#: The guidance defaults of the PAG drop-ins that differ from :class:`GuidanceOptions`': no SAG unless asked.
PAG_PIPELINE_DEFAULTS: dict[str, Any] = {"sag_scale": 0.0}


@dataclass(frozen=True)
class GuidanceOptions:
    """The SAG / blur-guidance / PAG options a pipeline call takes (diffusers' names: ``sag_scale``,
    ``pag_scale``, ``pag_applied_layers``, ...). ``sag_*`` build a :class:`attnguide.SAG` term (scale 0:
    none; ``sag_mask="global"`` is blur guidance), ``pag_*`` a :class:`attnguide.PAG` term, ``seg_*``,
    ``tpg_*`` and ``slg_*`` the :class:`attnguide.SEG`, :class:`attnguide.TPG` and :class:`attnguide.SLG`
    terms (scale 0: none), and
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
    seg_scale: float = 0.0
    seg_sigma: float = math.inf
    seg_layers: str | list[str] | None = None
    seg_window: tuple[float, float] = (0.0, 1.0)
    tpg_scale: float = 0.0
    tpg_layers: int | str | list[int | str] | None = None
    tpg_window: tuple[float, float] = (0.0, 1.0)
    slg_scale: float = 0.0
    slg_layers: int | str | list[int | str] | None = None
    slg_window: tuple[float, float] = (0.01, 0.2)
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
        """The SAG term (None when ``sag_scale`` is 0); ValueError naming the argument for bad values,
        also when the term is off."""
        check_scale("sag_scale", self.sag_scale)
        term = SAG(
            scale=self.sag_scale,
            layers=self.sag_layers,
            threshold=self.sag_threshold,
            blur_kernel_size=self.sag_blur_kernel_size,
            blur_sigma=self.sag_blur_sigma,
            mask=self.sag_mask,
            window=self.sag_window,
        )
        return None if self.sag_scale == 0 else term

    def pag(self) -> PAG | None:
        """The PAG term (None when ``pag_scale`` is 0 or no layer is named); ValueError naming the
        argument for bad values, also when the term is off."""
        check_scale("pag_scale", self.pag_scale)
        check_scale("pag_adaptive_scale", self.pag_adaptive_scale)
        layers = self.pag_applied_layers
        term = PAG(
            scale=self.pag_scale,
            adaptive_scale=self.pag_adaptive_scale,
            layers=layers,
            window=self.pag_window,
        )
        if self.pag_scale == 0 or (layers is not None and not isinstance(layers, str) and len(layers) == 0):
            return None
        return term

    def weak_terms(self) -> dict[str, SEG | TPG | SLG]:
        """The SEG, TPG and SLG terms whose scale is not 0, by the keyword ``attnguide.guide`` takes;
        ValueError naming the argument for bad values, also when a term is off."""
        terms = {
            "seg": SEG(
                scale=self.seg_scale, sigma=self.seg_sigma, layers=self.seg_layers, window=self.seg_window
            ),
            "tpg": TPG(scale=self.tpg_scale, layers=self.tpg_layers, window=self.tpg_window),
            "slg": SLG(scale=self.slg_scale, layers=self.slg_layers, window=self.slg_window),
        }
        return {name: term for name, term in terms.items() if term.scale != 0}

    def scales(self) -> dict[str, float]:
        """The guidance scales by name (what a non-finite output is blamed on)."""
        return {
            "sag_scale": self.sag_scale,
            "pag_scale": self.pag_scale,
            "seg_scale": self.seg_scale,
            "tpg_scale": self.tpg_scale,
            "slg_scale": self.slg_scale,
        }

    def check(self) -> tuple[SAG | None, PAG | None]:
        """Both terms, every option checked (``record_masks`` included)."""
        if not isinstance(self.record_masks, bool):
            raise ValueError(f"`record_masks` must be True or False, got {self.record_masks!r}")
        return self.sag(), self.pag()


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


#: The ``output_type`` values of diffusers' image and video pipelines.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(value: Any, allowed: Sequence[str] = OUTPUT_TYPES) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming ``output_type``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`output_type` must be one of {tuple(allowed)}, got {value!r}")
    return value


def image_size(
    call: dict[str, Any], default: int | tuple[int, int], factor: int, what: str = ""
) -> tuple[int, int]:
    """The call's (height, width): ``default`` (one size or a pair) where None, else a positive int
    divisible by ``factor`` (0 is an error, not the default)."""
    defaults = (default, default) if isinstance(default, int) else default
    sizes = (d if call[k] is None else call[k] for k, d in zip(("height", "width"), defaults, strict=True))
    height, width = (
        divisible_size(k, v, factor, what) for k, v in zip(("height", "width"), sizes, strict=True)
    )
    return height, width


def prompt_batch(call: dict[str, Any]) -> int | None:
    """The number of prompts of a call (from ``prompt``, else the rows of ``prompt_embeds``), None where
    neither says."""
    prompt = call.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    embeds = call.get("prompt_embeds")
    return embeds.shape[0] if isinstance(embeds, Tensor) and embeds.ndim > 0 else None


def images_per_prompt(call: dict[str, Any]) -> int:
    """``num_images_per_prompt`` (or ``num_videos_per_prompt``) of a call, checked; 1 where it has none."""
    for name in ("num_images_per_prompt", "num_videos_per_prompt"):
        if name in call:
            return positive_int(name, call[name])
    return 1


def latent_shape(call: dict[str, Any], channels: int, height: int, width: int) -> tuple[int, ...] | None:
    """The shape a text-to-image call's ``latents`` must have (None where the batch is unknown)."""
    batch = prompt_batch(call)
    return None if batch is None else (batch * images_per_prompt(call), channels, height, width)


_PER_PROMPT = ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")
_EMBEDS = {
    "prompt_embeds": 3,
    "negative_prompt_embeds": 3,
    "pooled_prompt_embeds": 2,
    "negative_pooled_prompt_embeds": 2,
}


def text_width(denoiser: Any) -> int | None:
    """The width of the text embeddings a UNet takes (its ``cross_attention_dim``, or ``encoder_hid_dim``
    where it projects the text first); None for other denoisers."""
    config = getattr(denoiser, "config", None)
    if "UNet" not in type(getattr(denoiser, "_orig_mod", denoiser)).__name__ or config is None:
        return None
    if getattr(config, "encoder_hid_dim_type", None) in ("text_proj", "text_image_proj"):
        width = getattr(config, "encoder_hid_dim", None)
    else:
        width = getattr(config, "cross_attention_dim", None)
    return width if isinstance(width, int) else None


def check_prompts(call: dict[str, Any], width: int | None) -> None:
    """Per-prompt lists with one entry per prompt; prompt embeddings: tensors of the right rank (and of
    the denoiser's text ``width``), pooled ones with as many rows as theirs."""
    batch = prompt_batch(call)
    for name in _PER_PROMPT:
        value = call.get(name)
        if isinstance(value, list) and batch is not None and len(value) != batch:
            raise ValueError(f"`{name}` must have one entry per prompt ({batch}), got a list of {len(value)}")
    for name, ndim in _EMBEDS.items():
        emb = call.get(name)
        if emb is None:
            continue
        if not isinstance(emb, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(emb).__name__}")
        if emb.ndim != ndim:
            raise ValueError(
                f"`{name}` must be a {ndim}-d tensor (batch first), got shape {tuple(emb.shape)}"
            )
        if ndim == 3 and width is not None and emb.shape[-1] != width:
            raise ValueError(
                f"`{name}` must be {width} wide (the denoiser's text embedding width), got shape "
                f"{tuple(emb.shape)}"
            )
    for neg in ("", "negative_"):
        emb, pooled = call.get(f"{neg}prompt_embeds"), call.get(f"{neg}pooled_prompt_embeds")
        if emb is not None and pooled is not None and pooled.shape[0] != emb.shape[0]:
            raise ValueError(f"`{neg}pooled_prompt_embeds` must have as many rows as `{neg}prompt_embeds`")


def _check_clip_skip(pipe: Any, clip_skip: Any) -> None:
    """None, or a number of text-encoder layers to skip that leaves at least one (each text encoder's)."""
    if clip_skip is None:
        return
    depths = [
        getattr(getattr(getattr(pipe, name, None), "config", None), "num_hidden_layers", None)
        for name in ("text_encoder", "text_encoder_2")
    ]
    depths = [d for d in depths if isinstance(d, int)]
    top = min(depths) - 1 if depths else None
    if (
        isinstance(clip_skip, bool)
        or not isinstance(clip_skip, int)
        or clip_skip < 0
        or (top is not None and clip_skip > top)
    ):
        allowed = (
            f"an integer in [0, {top}] (the text encoder has {top + 1} layers)"
            if top is not None
            else "an integer >= 0"
        )
        raise ValueError(f"`clip_skip` must be {allowed}, got {clip_skip!r}")


def check_call_arguments(
    pipe: Any, call: dict[str, Any], latents_shape: tuple[int, ...] | None = None
) -> None:
    """The checks of the call arguments that diffusers' pipelines share, each where the call has it:
    scales, ``eta``, steps or a custom schedule, images per prompt, ``output_type``, prompts and their
    embeddings, generators (one per image) and ``latents`` (the denoiser's dtype, finite, and
    ``latents_shape`` where given). ValueError / TypeError naming the argument, before any model runs."""
    denoiser = getattr(pipe, "unet", None)
    if denoiser is None:
        denoiser = getattr(pipe, "transformer", None)
    for name in ("guidance_scale", "true_cfg_scale", "guidance_rescale"):
        if name in call:
            check_scale(name, call[name])
    if "eta" in call:
        check_eta(call["eta"])
    scheduler = pipe.scheduler
    if call.get("timesteps") is not None and call.get("sigmas") is not None:
        raise ValueError("only one of `timesteps` or `sigmas` can be passed")
    for name in ("timesteps", "sigmas"):
        check_schedule(scheduler, name, call.get(name))
    if "num_inference_steps" in call and call.get("timesteps") is None and call.get("sigmas") is None:
        check_steps(scheduler, call["num_inference_steps"])
    per_prompt = images_per_prompt(call)
    if "output_type" in call:
        check_output_type(call["output_type"])
    check_prompts(call, text_width(denoiser))
    _check_clip_skip(pipe, call.get("clip_skip"))
    if call.get("cross_attention_kwargs") is not None and not isinstance(
        call["cross_attention_kwargs"], dict
    ):
        raise TypeError(
            f"`cross_attention_kwargs` must be a dict or None, got {call['cross_attention_kwargs']!r}"
        )
    for name in ("callback_on_step_end", "callback"):
        if call.get(name) is not None and not callable(call[name]):
            raise TypeError(f"`{name}` must be callable or None, got {call[name]!r}")
    batch = prompt_batch(call)
    if "generator" in call:
        check_generators(call["generator"], None if batch is None else batch * per_prompt)
    if call.get("latents") is not None:
        check_latents("latents", call["latents"], shape=latents_shape, dtype=getattr(denoiser, "dtype", None))


def check_class_labels(name: str, labels: Any, num_classes: int) -> list[int]:
    """Class labels: an int, a sequence of ints or an integer tensor, each in [0, num_classes)."""
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim > 1:
            raise ValueError(
                f"`{name}` must be an integer tensor of at most 1 dim, got {labels.dtype} {labels}"
            )
        labels = labels.reshape(-1).tolist()
    items = [labels] if not isinstance(labels, Sequence) or isinstance(labels, (str, bytes)) else list(labels)
    bad = [
        c
        for c in items
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c < num_classes
    ]
    if bad or not items:
        raise ValueError(
            f"`{name}` must be an integer or a list of integers in [0, {num_classes - 1}], got {labels!r}"
        )
    return [int(c) for c in items]


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
