"""The guided denoising step, shared by every pipeline.

A pipeline gathers its inputs into a *model function* ``model_fn(x, t, branches) -> output``: ``x`` is
``len(branches)`` chunks of the batch stacked on dim 0, and ``branches[i]`` ("cond" or "uncond") says
which conditioning chunk ``i`` gets. :class:`Guider` asks each active guidance term
(:mod:`attnguide.engine.terms`, the protocol in :mod:`attnguide.engine.terms.base`) for its rows of one
batched call ([uncond, cond, a row block per perturbation term]), runs that call with the terms acting
inside attention and around blocks, then asks each term for its extra pass (SAG's degraded input) and its
share of the guided prediction; CFG is the combine rule (:mod:`attnguide.engine.combine`). Any diffusers
scheduler works: the guided output goes to ``scheduler.step``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .attention import (
    DEFAULT_MAP_LIMITS,
    GuidanceState,
    MapLimits,
    ProcessorSwap,
    install_guidance_processors,
    model_lock,
)
from .blocks import BlockHooks
from .checks import check_eta, check_finite_output, check_latents, check_scale
from .combine import rescale_cfg
from .cuda_graphs import CudaGraphPasses, ModelFn, graph_safe
from .layout import LatentLayout
from .parameterization import (
    NoiseLevel,
    noise_level,
    output_for_scheduler,
    prediction_type_of,
    scheduler_takes_variance,
    uses_sigma_schedule,
)
from .terms import TERMS, StepContext, StepOutputs, Term, check_terms, in_window
from .terms.rule import edm_sigma, rule_of

__all__ = [
    "Guider",
    "ModelFn",
    "StepOutputs",
    "config_layout",
    "place_terms",
    "sample_loop",
    "scheduler_step_kwargs",
]


class Guider:
    """Guidance for one sampling run: validates and installs the terms' attention processors and block
    hooks (as a context manager that always removes them) and computes the guided model output at each
    step.

    model: the denoiser module (UNet or transformer) whose self-attention layers are used.
    scheduler: any diffusers scheduler (its ``prediction_type`` unless ``prediction_type`` is given).
    guidance_scale: CFG weight w, or None for no CFG (the model function then only sees "cond").
    **terms: the guidance terms by their registry names (``sag=SAG(...)``, ``pag=PAG(...)``, ``seg``,
    ``tpg``, ``slg``, ``classifier``: :data:`attnguide.engine.terms.TERMS`), None or scale 0 for off.
    Each term's layers and blocks are resolved here, before any model call.
    guidance_rescale: CFG rescale phi (diffusers' ``guidance_rescale``).
    record_masks: keep the sum of the SAG masks over the steps in ``mask_sum`` (paper Fig. 4).
    generator: the run's randomness (the ablation masks, TPG's permutations).
    cuda_graphs: replay the model passes from CUDA graphs on a CUDA device (:class:`CudaGraphPasses`);
    the model function's own tensors must then stay fixed during the run (else call ``graphs.reset()``).
    map_limits: when a SAG map is computed memory-flat (:class:`attnguide.engine.attention.MapLimits`).
    layout: the model's :class:`LatentLayout` (latent / conditioning / variance channels); None reads it
    from the model's config (``in_channels``, ``out_channels``), or from the first pass's shapes.
    owner: the thread whose calls are guided (None: every thread's), read by callers such as
    ``attnguide.guide``. Threads share one installation: :meth:`passes` holds ``step_lock``, so the
    passes of concurrent steps take turns and never see each other's state.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        prediction_type: str | None = None,
        record_masks: bool = False,
        generator: torch.Generator | None = None,
        cuda_graphs: bool = False,
        map_limits: MapLimits = DEFAULT_MAP_LIMITS,
        layout: LatentLayout | None = None,
        owner: int | None = None,
        **terms: Term | None,
    ):
        unknown = sorted(set(terms) - set(TERMS))
        if unknown:
            raise TypeError(
                f"Guider() got unexpected keyword argument(s) {unknown}; the terms are {list(TERMS)}"
            )
        _check_guider_arguments(model, scheduler, generator, map_limits, record_masks, cuda_graphs)
        self.terms: dict[str, Term] = check_terms({name: terms.get(name) for name in TERMS})
        self.model, self.scheduler = model, scheduler
        if guidance_scale is not None:
            guidance_scale = check_scale("guidance_scale", guidance_scale)
        self.guidance_scale = guidance_scale
        self.guidance_rescale = check_scale("guidance_rescale", guidance_rescale)
        self.prediction_type = prediction_type_of(model, scheduler, prediction_type)
        self.record_masks, self.map_limits = record_masks, map_limits
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.mask_sum: Tensor | None = None
        self.mask_steps = 0  # steps whose mask is in mask_sum
        self.last_mask: Tensor | None = None
        self.owner = owner
        self.step_lock = threading.RLock()
        self.state = GuidanceState()
        # Resolve layers and layout now, so a bad name or an unplaceable model fails before any model
        # call. A torch.compile wrapper (``torch.compile(unet)``) is looked through.
        inner = getattr(model, "_orig_mod", model)
        self.layout = layout if layout is not None else config_layout(inner, scheduler)
        self.capture, self.layers, self.blocks = place_terms(inner, self.terms)
        replayable = all(term.graph_safe for term in self.terms.values())
        self.graphs = (
            CudaGraphPasses(self.state) if cuda_graphs and replayable and graph_safe(inner) else None
        )
        self._swap = ProcessorSwap(inner)
        self._hooks = BlockHooks(inner, self.state, self.generator)
        self._lock = model_lock(inner)  # held from __enter__ to __exit__: one run at a time per model
        self._sigma_schedule: bool | None = None
        self._abar_table: Tensor | None = None
        self._memory = threading.local()  # each thread's run memory (CFG rules' state across steps)
        self.rule: Term | None = rule_of(self.terms)
        #: the last step's StepOutputs (of whichever thread ran it last)
        self.last_outputs: StepOutputs | None = None

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale is not None

    def scales(self) -> dict[str, float | None]:
        """The scales of this run by their pipeline names (what a non-finite output is blamed on)."""
        terms = {f"{name}_scale": t.scale if (t := self.terms.get(name)) else None for name in TERMS}
        return {
            "guidance_scale": self.guidance_scale,
            **terms,
            "guidance_rescale": self.guidance_rescale if self.do_cfg else None,
        }

    def check_output(self, output: Tensor) -> Tensor:
        """``output`` (a run's final sample) if it is finite (one host sync), else ValueError naming the
        scale that likely made it overflow."""
        return check_finite_output(output, self.scales())

    def guides_this_thread(self) -> bool:
        """Whether calls from the current thread are guided (see ``owner``). Inside a ``torch.compile``d
        model every call is (dynamo cannot read thread identities without a graph break)."""
        if self.owner is None or torch.compiler.is_compiling():
            return True
        return self.owner == threading.get_ident()

    def __enter__(self) -> Guider:
        self._lock.acquire()
        try:
            capture = [layer for layers in self.capture.values() for layer in layers]
            attending = {n: (t, self.layers[n]) for n, t in self.terms.items() if self.layers[n]}
            install_guidance_processors(self._swap, self.state, capture, attending, self.map_limits)
            self._hooks.install({n: (t, self.blocks[n]) for n, t in self.terms.items() if self.blocks[n]})
        except BaseException:
            self._hooks.remove()
            self._swap.restore()
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._hooks.remove()
            self._swap.restore()
            self.state.maps.clear()
            if self.graphs is not None:
                self.graphs.reset()
        finally:
            self._lock.release()

    def _call_model(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str], inputs_key: tuple
    ) -> Tensor:
        if self.graphs is not None:
            return self.graphs(model_fn, x, t, branches, inputs_key)
        return model_fn(x, t, branches)

    # ------------------------------------------------------------------ one step
    def passes(
        self,
        model_fn: ModelFn,
        x_in: Tensor,
        t: Tensor,
        *,
        step: int = 0,
        num_steps: int = 1,
        inputs_key: tuple = (),
        cfg: bool | None = None,
        call: str | None = None,
        image_tokens: int = 0,
        guidance_scale: float | None = None,
        memory: dict | None = None,
    ) -> StepOutputs:
        """Run the model passes of one step on the model input ``x_in`` (after ``scale_model_input``):
        one batched call [uncond?, cond, a row block per perturbation term], then each term's extra pass.
        ``cfg``: whether the model function has an "uncond" branch (default: ``guidance_scale`` given).
        ``call``: for pipelines that make the CFG branches in separate calls, which one this is ("cond":
        the perturbation terms ride in it; "uncond": SAG), None: one call has every term.
        ``image_tokens``: the model call's image tokens, where a layer's sequence can also hold text
        tokens (:class:`GuidanceState`). ``inputs_key`` identifies the model function's own inputs for
        the CUDA-graph cache (tensors by address: a captured graph reads them there).
        ``guidance_scale``: the CFG weight where the caller's pipeline applies CFG itself (default: this
        Guider's); ``memory``: the run's memory of the CFG rule (default: one per thread, new at step 0).
        Holds ``step_lock`` (threads take turns)."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if memory is None:
            memory = self._run_memory(step)
        run = (model_fn, x_in, t, step, num_steps, inputs_key, cfg, call, image_tokens, w, memory)
        if torch.compiler.is_compiling():  # traced into a compiled model: dynamo cannot enter a lock
            return self._passes(*run)
        with self.step_lock:
            return self._passes(*run)

    def active_terms(self, step: int, num_steps: int, call: str | None = None) -> dict[str, Term]:
        """The terms that act at ``step`` of ``num_steps`` (their windows), in the call ``call`` (see
        :meth:`passes`); ValueError for a term that cannot ride in a separate CFG call."""
        active = {n: t for n, t in self.terms.items() if t.rule or in_window(t.window, step, num_steps)}
        if call is None:
            return active
        for name, term in active.items():
            if term.separate_call is None:
                raise ValueError(
                    f"`{name}`: {term.title} is not supported where the CFG branches come in separate "
                    "denoiser calls (cfg_layout 'separate', Flux's true CFG)"
                )
        return {n: t for n, t in active.items() if t.separate_call in (call, "both")}

    def _run_memory(self, step: int) -> dict:
        """This thread's memory of the current run (a new one at step 0)."""
        if step == 0 or not hasattr(self._memory, "run"):
            self._memory.run = {}
        return self._memory.run

    def check_rule(self, do_cfg: bool, w: float | None) -> None:
        """ValueError where the run's CFG rule would have no CFG to work on (no unconditional branch, or
        no weight w)."""
        rule = self.rule
        if rule is not None and (not do_cfg or w is None):
            raise ValueError(
                f"`{rule.name}`: {rule.title} is a CFG rule: it needs classifier-free guidance (the "
                "unconditional prediction and the weight w: guidance_scale > 1)"
            )

    def _with_rule(self, do_cfg: bool, cfg: bool | None, w: float | None, t: Tensor, step, num_steps) -> bool:
        """Whether this step has its unconditional rows, given the run's CFG rule: ValueError where the rule
        has no CFG to work on; no rows where the loop is the engine's own (``cfg`` None) and the rule, at
        scale 1, gives c at this step."""
        rule = self.rule
        if rule is None:
            return do_cfg
        self.check_rule(do_cfg, w)
        if cfg is None and rule.scale == 1.0:
            return rule.in_effect(step, num_steps, lambda: edm_sigma(self._level(t)))
        return True

    def _passes(
        self, model_fn, x_in, t, step, num_steps, inputs_key, cfg, call, image_tokens, w, memory
    ) -> StepOutputs:
        st = self.state
        do_cfg = self._with_rule(self.do_cfg if cfg is None else cfg, cfg, w, t, step, num_steps)
        if self.layout is not None:
            self.layout.check_input(x_in)
        if self._sigma_schedule is None:
            self._sigma_schedule = uses_sigma_schedule(self.scheduler, self.scheduler.timesteps)
        active = self.active_terms(step, num_steps, call)
        st.everywhere = frozenset(name for name, term in active.items() if term.acts_on == "all")
        try:
            res, layout = self._batched_call(model_fn, x_in, t, active, do_cfg, inputs_key, image_tokens)
            ctx = self._context(model_fn, x_in, t, res, do_cfg, layout, inputs_key)
            ctx.step, ctx.num_steps, ctx.guidance_scale, ctx.memory = step, num_steps, w, memory
            for name, term in active.items():
                if not term.rows:
                    weak = term.extra_pass(ctx)  # the terms that act everywhere act in it too
                    if weak is not None:
                        res.weak[name] = weak
                delta = term.delta(ctx)
                if delta is not None:
                    res.deltas[name] = delta
        finally:
            st.everywhere = frozenset()
        self.last_outputs = res
        return res

    def _batched_call(
        self, model_fn, x_in, t, active, do_cfg, inputs_key, image_tokens
    ) -> tuple[StepOutputs, LatentLayout]:
        """The step's one batched call [uncond?, cond, a row block per term with rows], its predictions
        split by branch (the terms' rows in ``weak``), and the model's layout."""
        st = self.state
        b = x_in.shape[0]
        batched = [name for name, term in active.items() for _ in range(term.rows)]
        branches = (["uncond"] if do_cfg else []) + ["cond"] + [active[name].branch for name in batched]
        first = len(branches) - len(batched)
        x_main = torch.cat([x_in] * len(branches)) if len(branches) > 1 else x_in
        st.maps.clear()
        st.groups = {name: ((first + i) * b, (first + i + 1) * b) for i, name in enumerate(batched)}
        st.cond_rows = ((first - 1) * b, first * b)
        st.capture = any(self.capture[name] for name in active)
        st.capture_rows = b  # the map of the reference branch, the first chunk, is all that is used
        st.batch_rows = x_main.shape[0]
        st.thread = None if torch.compiler.is_compiling() else threading.get_ident()
        st.image_tokens = image_tokens
        st.image_size = tuple(x_in.shape[-2:])
        st.frames = x_in.shape[2] if x_in.ndim == 5 else 1
        try:
            out = self._call_model(model_fn, x_main, t, branches, inputs_key)
        finally:
            st.groups = {}
            st.cond_rows = None
            st.capture = False
            st.capture_rows = 0
        layout = self.layout or LatentLayout.from_channels(
            x_in.shape[1], out.shape[1], variance=scheduler_takes_variance(self.scheduler)
        )
        preds, variances = zip(*(layout.split_output(c) for c in out.chunk(len(branches))), strict=True)
        i_cond = 1 if do_cfg else 0
        res = StepOutputs(
            out_cond=preds[i_cond],
            out_uncond=preds[0] if do_cfg else None,
            variance=variances[i_cond],
            weak={name: preds[first + i] for i, name in enumerate(batched)},
            x_in=x_in,
        )
        return res, layout

    def _context(self, model_fn, x_in, t, res, do_cfg, layout, inputs_key) -> StepContext:
        """What the terms may read of this step (:class:`StepContext`)."""

        def call(x: Tensor, branches: Sequence[str]) -> Tensor:
            self.state.batch_rows = x.shape[0]
            pred, _ = layout.split_output(self._call_model(model_fn, x, t, branches, inputs_key))
            return pred

        return StepContext(
            x_in=x_in,
            t=t,
            outputs=res,
            cfg=do_cfg,
            layout=layout,
            prediction_type=self.prediction_type,
            level=lambda: self._level(t),
            call=call,
            maps=self.state.maps,
            capture_layers=lambda name: self.capture.get(name, []),
            generator=self.generator,
            record_mask=self._record_mask,
        )

    def _level(self, t: Tensor) -> NoiseLevel:
        """The noise level x_in = a x0 + b eps at ``t`` (``alphas_cumprod`` on the device of ``t``, copied
        once per run)."""
        table = getattr(self.scheduler, "alphas_cumprod", None)
        if not isinstance(t, Tensor) or table is None or self._sigma_schedule:
            table = None
        else:
            if self._abar_table is None or self._abar_table.device != t.device:
                self._abar_table = table.to(device=t.device)
            table = self._abar_table
        return noise_level(self.scheduler, t, sigma_schedule=self._sigma_schedule, table=table)

    def _record_mask(self, mask: Tensor) -> None:
        """Keep SAG's mask of this step (``record_masks``: ``last_mask``, ``mask_sum``, ``mask_steps``)."""
        if self.record_masks:
            m = mask.detach().float()
            self.last_mask = m
            self.mask_sum = m if self.mask_sum is None else self.mask_sum + m
            self.mask_steps += 1

    def __call__(
        self, model_fn: ModelFn, sample: Tensor, t: Tensor, *, step: int = 0, num_steps: int = 1
    ) -> Tensor:
        """The guided model output for ``sample`` at timestep ``t`` (to hand to ``scheduler.step``).

        With a learned variance, the variance channels of the conditional pass are kept.
        """
        return self.guided_output(self.step_outputs(model_fn, sample, t, step=step, num_steps=num_steps))

    def step_outputs(
        self, model_fn: ModelFn, sample: Tensor, t: Tensor, *, step: int = 0, num_steps: int = 1
    ) -> StepOutputs:
        """:meth:`passes` on the scheduler's model input for ``sample`` (``scale_model_input``)."""
        scale = getattr(self.scheduler, "scale_model_input", None)  # flow-matching schedulers have none
        x_in = scale(sample, t) if scale is not None else sample
        return self.passes(model_fn, x_in, t, step=step, num_steps=num_steps)

    def guided_output(self, r: StepOutputs) -> Tensor:
        """The guided model output of one step's passes ``r``: the terms combined with this run's CFG
        weight and rescale, the conditional pass's variance channels appended where the model has them."""
        guided = r.combined(self.guidance_scale if self.do_cfg else 1.0)
        if self.do_cfg and self.guidance_rescale > 0.0:
            guided = rescale_cfg(guided, r.out_cond, self.guidance_rescale)
        return guided if r.variance is None else torch.cat([guided, r.variance], dim=1)


Placement = dict[str, list[str]]


def place_terms(model: nn.Module, terms: dict[str, Term]) -> tuple[Placement, Placement, Placement]:
    """Where each term acts in ``model``: the layers whose maps it reads, the attention layers and the
    blocks where it acts, each by term name. ValueError, before any model call, where a term cannot act
    on the model (a layer name that matches nothing, a kind of attention it has no meaning for, two
    terms in one layer where one changes every row)."""
    capture = {name: term.capture_layers(model) for name, term in terms.items()}
    layers = {name: term.attention_layers(model) for name, term in terms.items()}
    blocks = {name: term.blocks(model) for name, term in terms.items()}
    modules = dict(model.named_modules())
    for name, term in terms.items():
        term.check_model(model, {layer: modules[layer].processor for layer in layers[name]})
    _check_overlaps(terms, layers, blocks)
    return capture, layers, blocks


def _check_overlaps(
    terms: dict[str, Term], layers: dict[str, list[str]], blocks: dict[str, list[str]]
) -> None:
    """ValueError where a term that acts on every row shares a layer or block with another term (their
    changes of one attention call or block would not compose)."""
    for name, term in terms.items():
        if term.acts_on != "all":
            continue
        mine = set(layers[name]) | set(blocks[name])
        for other in terms:
            shared = mine & (set(layers[other]) | set(blocks[other])) if other != name else set()
            if shared:
                where = sorted(shared)[0]
                raise ValueError(
                    f"`{name}` and `{other}` both act in {where!r}; {term.title} changes every row there: "
                    "give them different layers"
                )


def _check_guider_arguments(model, scheduler, generator, map_limits, record_masks, cuda_graphs) -> None:
    """TypeError for the objects a :class:`Guider` takes that are not of their kind."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a UNet or transformer), got {model!r}")
    needed = ("config", "set_timesteps", "step")  # flow-matching schedulers have no scale_model_input
    missing = [a for a in needed if not hasattr(scheduler, a)]
    if missing:
        raise TypeError(
            f"`scheduler` must be a diffusers scheduler (config, set_timesteps, step), "
            f"got {type(scheduler).__name__} without {', '.join(missing)}"
        )
    for name, flag in (("record_masks", record_masks), ("cuda_graphs", cuda_graphs)):
        if not isinstance(flag, bool):
            raise ValueError(f"`{name}` must be True or False, got {flag!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator (or None), got {generator!r}")
    if not isinstance(map_limits, MapLimits):
        raise TypeError(f"`map_limits` must be an attnguide.engine.attention.MapLimits, got {map_limits!r}")


def config_layout(model: nn.Module, scheduler) -> LatentLayout | None:
    """The :class:`LatentLayout` that ``model``'s config gives (``in_channels``, ``out_channels``), or
    None for a model without one (then the first pass's shapes give it). ValueError where the channels
    cannot be placed, before any model call."""
    config = getattr(model, "config", None)
    in_ch = getattr(config, "in_channels", None)
    if not isinstance(in_ch, int):
        return None
    out_ch = model.__dict__.get("out_channels")  # transformers set it (learned sigma); UNets: the config
    if not isinstance(out_ch, int):
        out_ch = getattr(config, "out_channels", None)
    out_ch = out_ch if isinstance(out_ch, int) else in_ch
    return LatentLayout.from_channels(in_ch, out_ch, variance=scheduler_takes_variance(scheduler))


def scheduler_step_kwargs(scheduler, generator: torch.Generator | list | None, eta: float) -> dict:
    """The ``generator`` and ``eta`` keywords that this scheduler's ``step`` accepts."""
    check_eta(eta)
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict = {}
    if "generator" in params:
        out["generator"] = generator
    if "eta" in params:
        out["eta"] = eta
    return out


def sample_loop(
    guider: Guider,
    model_fn: ModelFn,
    latents: Tensor,
    *,
    extra_step_kwargs: dict | None = None,
    progress: Callable | None = None,
    callback: Callable[..., None] | None = None,
    check_output: bool = True,
) -> Tensor:
    """Denoise ``latents`` over ``guider.scheduler.timesteps`` (set them first) with guidance at every step.

    The loop of every non-SD pipeline and of bare denoiser + scheduler use: guided output, then
    ``scheduler.step``, under ``torch.inference_mode()`` (no autograd graph is kept; classifier
    guidance takes its gradient outside it). ``progress`` wraps the timestep iterable (a tqdm-like
    callable); ``callback(i, t, latents)`` runs after each step, or ``callback(i, t, latents, outputs)``
    where it takes four arguments: ``outputs`` is the step's :class:`StepOutputs` (each term's weak
    prediction and share). ``latents`` must be a finite floating-point tensor; with ``check_output`` the
    result is checked once at the end (:meth:`Guider.check_output`: a ValueError naming the likely scale
    instead of NaN samples).
    """
    if not isinstance(guider, Guider):
        raise TypeError(f"`guider` must be an attnguide.Guider, got {type(guider).__name__}")
    if not callable(model_fn):
        raise TypeError(f"`model_fn` must be a function model_fn(x, t, branches), got {model_fn!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable or None, got {callback!r}")
    check_latents("latents", latents)
    if latents.ndim not in (4, 5):
        raise ValueError(
            f"`latents` must be (B, C, H, W) or (B, C, F, H, W), got shape {tuple(latents.shape)}"
        )
    guider.check_rule(guider.do_cfg, guider.guidance_scale)
    with_outputs = callback is not None and _positional_arity(callback) >= 4
    scheduler = guider.scheduler
    timesteps = scheduler.timesteps
    steps = progress(timesteps) if progress is not None else timesteps
    channels = latents.shape[1]
    with guider, torch.inference_mode():
        for i, t in enumerate(steps):
            r = guider.step_outputs(model_fn, latents, t, step=i, num_steps=len(timesteps))
            out = output_for_scheduler(guider.guided_output(r), channels, scheduler)
            latents = scheduler.step(out, t, latents, **(extra_step_kwargs or {}), return_dict=False)[0]
            if callback is not None:
                callback(i, t, latents, r) if with_outputs else callback(i, t, latents)
    return guider.check_output(latents) if check_output else latents


def _positional_arity(fn: Callable) -> int:
    """How many positional arguments ``fn`` takes (a large number for ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 3
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 99
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in params)
