"""attnguide's terms inside diffusers' modular pipelines: :class:`AttnGuidance`, a
``diffusers.guiders.BaseGuidance`` that a ``ModularPipeline`` takes as its ``guider`` component.

A modular pipeline's denoise loop runs each condition as its own denoiser call (conditional first, then
unconditional) and hands the predictions to the guider's ``forward``. Each call is guided here with
:func:`attnguide.guide` for that one call: ``prepare_models`` puts a one-shot forward on the denoiser that
opens a ``guide`` block around the call and closes it when the call returns or raises (nothing stays
installed). The conditional call carries the perturbation terms' rows in the same batched call (PAG, SEG,
TPG, SLG), the unconditional one SAG's extra pass (its map and reference are u, as Eq. 16), PLADIS acts
in both; ``forward`` then combines like the classic pipelines:

    out = CFG (or the CFG rule) of the raw c and u  +  every term's share

so a modular pipeline with ``AttnGuidance(w, pag=PAG(2.0), sag=SAG(0.75))`` gives the classic pipeline's
``guide(pipe, pag=..., sag=...)`` result (tested on tiny SDXL and Wan builds). A CFG rule (``apg=APG()``)
replaces CFG here. The terms' windows use the loop's step index.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

from ..engine.attention import model_lock
from ..engine.checks import check_scale
from ..engine.parameterization import noise_level, uses_sigma_schedule
from ..engine.terms import TERMS, Term, check_terms
from ..engine.terms.rule import CFGRule, RuleState, edm_sigma, rule_of
from .guide import guided_call

__all__ = ["AttnGuidance"]


def _config_of(term: Term) -> dict[str, Any]:
    """A term's fields as JSON-able config (tuples as lists; callables are not allowed)."""
    out = {}
    for f in dataclasses.fields(term):  # type: ignore[arg-type]
        value = getattr(term, f.name)
        if callable(value):
            raise ValueError(
                f"`{term.name}`: {term.title} cannot be a modular guider's term ({f.name} is code)"
            )
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _term_of(name: str, value: Term | dict[str, Any]) -> Term:
    cls = TERMS.get(name)
    if cls is None:
        raise TypeError(f"AttnGuidance got an unknown term {name!r}; the terms are {list(TERMS)}")
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(
            f"`{name}` must be an attnguide.{cls.__name__} (or its fields as a dict), got {value!r}"
        )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return cls(**fields)


@dataclasses.dataclass
class _ThreadState:
    """One thread's place in its pipeline call: diffusers' guider state (step, steps, timestep, passes
    prepared), the terms' shares of this step by call, the CFG rule's memory and the calling pipeline."""

    step: int | None = None
    num_steps: int | None = None
    timestep: Any = None
    count: int = 0
    deltas: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    components: Any = None


def _per_thread(name: str) -> property:
    """A ``BaseGuidance`` attribute kept per thread (two threads' pipeline calls never mix their steps)."""

    def get(self: AttnGuidance) -> Any:
        return getattr(self._local, name)

    def put(self: AttnGuidance, value: Any) -> None:
        setattr(self._local, name, value)

    return property(get, put)


class AttnGuidance(BaseGuidance):
    """attnguide's guidance terms and CFG rules as a modular pipeline's guider (see the module text).

    guidance_scale, guidance_rescale, start, stop, enabled: as diffusers' ``ClassifierFreeGuidance`` (the
    CFG weight w, its rescale, the window of CFG as fractions of the steps). ``terms`` (or the terms as
    keywords: ``AttnGuidance(7.5, pag=PAG(2.0), apg=APG())``): the terms by their registry names, as
    objects or as their fields (what ``from_config`` and ``save_pretrained`` use). Classifier guidance
    is not offered here (its gradient function is code).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]
    _step = _per_thread("step")
    _num_inference_steps = _per_thread("num_steps")
    _timestep = _per_thread("timestep")
    _count_prepared = _per_thread("count")

    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        terms: dict[str, Any] | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        **term_objects: Any,
    ):
        self._threads = threading.local()
        super().__init__(start, stop, enabled)
        given = {**(terms or {}), **term_objects}
        self.terms: dict[str, Term] = check_terms({n: _term_of(n, v) for n, v in given.items()})
        self.guidance_scale = check_scale("guidance_scale", guidance_scale)
        self.guidance_rescale = check_scale("guidance_rescale", guidance_rescale)
        self.rule: CFGRule | None = rule_of(self.terms)  # type: ignore[assignment]
        config = {n: _config_of(t) for n, t in self.terms.items()}
        self.register_to_config(
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            terms=config,
            start=start,
            stop=stop,
            enabled=enabled,
        )

    @property
    def _local(self) -> _ThreadState:
        state = getattr(self._threads, "state", None)
        if state is None:
            state = self._threads.state = _ThreadState()
        return state

    # ------------------------------------------------------------------ diffusers' guider protocol
    def _cfg_on(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            first, last = (
                int(self._start * self._num_inference_steps),
                int(self._stop * self._num_inference_steps),
            )
            if not first <= self._step < last:
                return False
        return not math.isclose(self.guidance_scale, 1.0)

    @property
    def num_conditions(self) -> int:
        return 2 if self._cfg_on() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def prepare_inputs(self, data: dict[str, Any]) -> list[Any]:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch(data, i, n) for i, n in zip(indices, self._input_predictions, strict=False)
        ]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, Any]) -> list[Any]:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, n)
            for i, n in zip(indices, self._input_predictions, strict=False)
        ]

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._local.deltas = {}
        if step == 0:
            self._local.memory = {}  # a new run: the CFG rule's state starts again

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        which = "cond" if self._count_prepared == 1 else "uncond"
        alone = self.num_conditions == 1  # no unconditional call this step: every term rides this one
        terms = {
            n: t
            for n, t in self.terms.items()
            if not t.rule and (alone or t.separate_call in (which, "both"))
        }
        if terms:
            state = self._local
            state.components = _loop_components(self, sys._getframe(1))
            step = (state.step or 0, max(state.num_steps or 1, (state.step or 0) + 1))

            def job(forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
                out, r = guided_call(state.components, forward, args, kwargs, at_step=step, **terms)
                if r is not None and r.deltas:
                    state.deltas[which] = r.terms_delta()
                return out

            _add_job(denoiser, job)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        _release(denoiser, drop_mine=True)  # where the call never came

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        d_cond, d_uncond = self._local.deltas.get("cond"), self._local.deltas.get("uncond")
        c = pred_cond if d_cond is None else pred_cond - d_cond
        if pred_uncond is None or not self._cfg_on():
            pred = c
        else:
            u = pred_uncond if d_uncond is None else pred_uncond - d_uncond
            if self.rule is not None:
                pred = self.rule.guided(c, u, self.guidance_scale, self._rule_state())
            else:
                pred = u + self.guidance_scale * (c - u)
        for d in (d_cond, d_uncond):
            if d is not None:
                pred = pred + d
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, c, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def _rule_state(self) -> RuleState:
        def sigma() -> float:
            scheduler = getattr(self._local.components, "scheduler", None)
            if scheduler is None:
                raise ValueError(f"`{self.rule.name}`: the noise level needs the pipeline's scheduler")
            t = torch.as_tensor(self._timestep)
            return edm_sigma(
                noise_level(scheduler, t, sigma_schedule=uses_sigma_schedule(scheduler, scheduler.timesteps))
            )

        return RuleState(self._step or 0, self._num_inference_steps or 1, self._local.memory, sigma)


class _Dispatcher:
    """The denoiser's forward while some thread's guided call is pending: each thread's call runs its own
    job (:func:`guided_call` with that pass's terms), a call with no job runs the original forward; every
    call holds the model's lock, so no call meets another's processors. It removes itself once no job is
    pending (also when a call raises)."""

    def __init__(self, denoiser: torch.nn.Module, original: Callable[..., Any]):
        self.denoiser, self.original = denoiser, original
        self.pending: dict[int, Callable[..., Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        job = self.pending.pop(threading.get_ident(), None)
        try:
            with model_lock(self.denoiser):
                return self.original(*args, **kwargs) if job is None else job(self.original, args, kwargs)
        finally:
            _release(self.denoiser)


_INSTALL = threading.Lock()  # installs and removals of the dispatchers


def _add_job(denoiser: torch.nn.Module, job: Callable[..., Any]) -> None:
    with _INSTALL:
        dispatcher = denoiser.__dict__.get("forward")
        if not isinstance(dispatcher, _Dispatcher):
            dispatcher = _Dispatcher(denoiser, denoiser.forward)
            denoiser.forward = dispatcher
        dispatcher.pending[threading.get_ident()] = job


def _release(denoiser: torch.nn.Module, drop_mine: bool = False) -> None:
    """Remove this thread's pending job (``drop_mine``: its call never came) and the dispatcher once no
    job is pending."""
    with _INSTALL:
        dispatcher = denoiser.__dict__.get("forward")
        if not isinstance(dispatcher, _Dispatcher):
            return
        if drop_mine:
            dispatcher.pending.pop(threading.get_ident(), None)
        if not dispatcher.pending:
            del denoiser.__dict__["forward"]


def _loop_components(guider: AttnGuidance, frame: Any) -> Any:
    """The modular pipeline whose loop calls ``guider`` (the ``components`` of the calling loop block,
    holding its scheduler); ValueError where there is none."""
    while frame is not None:
        components = frame.f_locals.get("components")
        if components is not None and any(
            getattr(components, n, None) is guider for n in ("guider", "guider_2")
        ):
            return components
        frame = frame.f_back
    raise ValueError(
        "AttnGuidance: it guides the denoiser calls of a diffusers ModularPipeline's denoise loop (set it "
        "with pipe.update_components(guider=AttnGuidance(...)))"
    )
