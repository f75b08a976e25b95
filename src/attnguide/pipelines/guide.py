"""The one guided-pipeline mechanism: guidance for an existing diffusers pipeline (or a bare denoiser)
without copying its loop.

``with attnguide.guide(pipe, sag=SAG(scale=0.5)): images = pipe(...).images`` runs the pipeline's own
loop unchanged; while the block lasts, each call of the denoiser runs the guidance passes of
:meth:`attnguide.engine.step.Guider.passes` (SAG's degraded input, PAG's perturbed batch) and returns
outputs whose CFG combination is the guided prediction. attnguide's Stable Diffusion and SDXL pipelines
are diffusers' own pipelines run inside this block.

Why it is exact: the guidance terms add d = s_sag (ref - degraded) + s_pag (c - perturbed) to the
prediction. A pipeline that combines u + w (c - u) gets u + w (c - u) + d when it is handed c and
u - d / (w - 1) (w known: diffusers' text pipelines; then its CFG rescale still sees the unguided c, as
diffusers' PAG pipelines do), or c + d and u + d (w unknown, e.g. DiT); without CFG it gets c + d.

Where the CFG branches sit is read, not guessed: diffusers' text pipelines pass
``do_classifier_free_guidance`` to ``encode_prompt`` (recorded at each call, per thread) and put
[uncond, cond]; DiT puts [cond, null label]; a pipeline whose ``__call__`` takes no ``guidance_scale``
has no CFG. Flux pipelines never batch CFG: with ``true_cfg_scale`` they encode a second (negative)
prompt and call the transformer twice per step, conditional first ("separate"; see
``GuidedForward._separate_call``). Anything else needs ``cfg_layout``.

Threads: one block serves every thread that calls the pipeline inside it; each thread keeps its own
place in its pipeline call (for step windows) and the passes of one step hold the guider's step lock, so
concurrent calls take turns step by step and give the sequential results. Blocks on one denoiser take
turns as a whole (the model's lock); a block nested in another on the same denoiser raises ValueError at
entry.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.attention import DEFAULT_MAP_LIMITS, MapLimits, model_lock
from ..engine.checks import check_scale
from ..engine.layout import LatentLayout, pack_2x2, position_grid, unpack_2x2
from ..engine.parameterization import scheduler_takes_variance
from ..engine.step import Guider, StepOutputs
from ..engine.terms import TERMS, Term, check_terms

CFG_LAYOUTS = ("auto", "uncond_first", "cond_first", "none", "separate")

#: Denoisers whose pipelines never batch the CFG branches; with CFG (Flux's ``true_cfg_scale`` and a
#: negative prompt) they call the denoiser twice per step, conditional first, and encode the negative
#: prompt in a second ``encode_prompt`` call. Their latents are packed 2x2 tokens, placed by ``img_ids``.
SEPARATE_CFG_MODELS = frozenset({"FluxTransformer2DModel"})

#: Keyword arguments of those denoisers that hold per-token positions, never per-row values.
POSITION_ARGS = frozenset({"img_ids", "txt_ids"})

#: Denoisers whose latents are packed 2x2 tokens (B, H/2 * W/2, 4C): their config's channels are 4C.
PACKED_MODELS = frozenset({"FluxTransformer2DModel"})


def _select_rows(obj: Any, parts: list[slice], total: int, per_row: int = 1) -> Any:
    """The rows ``parts`` (stacked in that order) of every tensor in ``obj`` (nested dicts / lists /
    tuples) whose first dim is ``total``, or ``total * per_row`` (video pipelines hand in one row per
    frame, batch-major); other values as they are."""
    if isinstance(obj, Tensor):
        if obj.ndim == 0:
            return obj
        k = 1 if obj.shape[0] == total else per_row if obj.shape[0] == total * per_row else 0
        if k == 0:
            return obj
        picked = [obj[p.start * k : p.stop * k] for p in parts]
        return picked[0] if len(picked) == 1 else torch.cat(picked)
    if isinstance(obj, dict):
        return {key: _select_rows(v, parts, total, per_row) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_select_rows(v, parts, total, per_row) for v in obj)
    return obj


def _inputs_key(obj: Any) -> tuple:
    """What a CUDA graph of a model call depends on besides x and t: the address, shape and dtype of
    every tensor argument and the value of every other one (a replay reads the tensors at those
    addresses, so a pipeline that hands in new tensors gets a new graph)."""
    if isinstance(obj, Tensor):
        return ("T", obj.data_ptr(), tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return tuple((k, _inputs_key(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return tuple(_inputs_key(v) for v in obj)
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return ("v", obj)


def resolve_cfg_layout(
    layout: str, pipe: Any, module: nn.Module, x: Tensor, kwargs: dict, recorded: bool | None = None
) -> str:
    """Resolve "auto" from what is known of this call: ``recorded`` (the ``do_classifier_free_guidance``
    this thread's pipeline call passed to ``encode_prompt``: diffusers' text pipelines, [uncond, cond]),
    else the pipeline's ``do_classifier_free_guidance`` property, else DiT's null label in the second
    half ([cond, null]), else "none" for a pipeline without ``guidance_scale``. ValueError otherwise."""
    if layout != "auto":
        return layout
    if recorded is not None:
        return "uncond_first" if recorded else "none"
    try:
        flag = getattr(pipe, "do_classifier_free_guidance", None) if pipe is not None else None
    except Exception:  # a property read outside a call
        flag = None
    if isinstance(flag, bool):
        return "uncond_first" if flag else "none"
    labels = kwargs.get("class_labels")
    null = getattr(getattr(module, "config", None), "num_embeds_ada_norm", None)
    if isinstance(labels, Tensor) and null is not None and labels.ndim == 1:
        half = labels.shape[0] // 2
        even = labels.shape[0] % 2 == 0 and x.shape[0] % 2 == 0 and half > 0
        if even and bool((labels[half:] == null).all()) and not bool((labels[:half] == null).all()):
            return "cond_first"
        return "none"
    if pipe is not None and "guidance_scale" not in inspect.signature(type(pipe).__call__).parameters:
        return "none"
    where = type(pipe).__name__ if pipe is not None else "your loop"
    raise ValueError(
        f"`cfg_layout`: attnguide cannot tell where {where}"
        " puts the classifier-free guidance branches in the denoiser batch; pass cfg_layout="
        "'uncond_first' ([uncond, cond]), 'cond_first' ([cond, uncond]) or 'none' (no CFG)"
    )


def branch_rows(layout: str, total: int) -> dict[str, slice]:
    """Where each CFG branch sits in a denoiser batch of ``total`` rows."""
    if layout == "none":
        return {"cond": slice(0, total)}
    if total % 2:
        raise ValueError(f"attnguide.guide: CFG layout {layout!r} needs an even batch, got {total}")
    b = total // 2
    first, second = slice(0, b), slice(b, total)
    return (
        {"uncond": first, "cond": second} if layout == "uncond_first" else {"cond": first, "uncond": second}
    )


def _cfg_weight(pipe: Any) -> float | None:
    """The pipeline's CFG weight w during a call, where it says (diffusers' ``guidance_scale``)."""
    try:
        w = getattr(pipe, "guidance_scale", None)
    except Exception:
        return None
    return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and w > 1 else None


def _call_argument(pipe: Any, name: str) -> float | None:
    """The value of ``name`` in the innermost running ``__call__`` of ``pipe`` on this thread's stack
    (diffusers' older pipelines keep their ``guidance_scale`` in a local only); None where there is none
    or it is not a number."""
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "__call__"
            and frame.f_locals.get("self") is pipe
            and name in frame.f_locals
        ):
            value = frame.f_locals[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            return float(value) if ok else None
        frame = frame.f_back
    return None


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values (``b`` cast to ``a``'s dtype and device: a pipeline may
    cast its embeddings to the denoiser's dtype before the call)."""
    return a is b or (a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype)))


class _Position(threading.local):
    """One thread's place in its current pipeline call: the schedule index where the call started and
    the last one seen (a new call starts where the index goes back), and a count of calls whose timestep
    is not in the schedule. With CFG as separate calls: the layout of this pipeline call and the
    conditional call of the current step, waiting for its unconditional twin (:class:`_Pending`)."""

    start: int = 0
    last: int | None = None
    count: int = 0
    separate: str = "none"
    branch: str | None = None  # the CFG branch of this call, where CFG comes in two calls and it is known
    pending: _Pending | None = None
    memory: dict | None = None  # the CFG rule's state in this pipeline call


@dataclass
class _Pending:
    """A conditional call answered in a step whose CFG comes in separate calls: what it returned (to be
    completed in place by the unconditional call) and its share of the guidance terms (PAG's)."""

    sample: Tensor
    t: Tensor
    returned: Tensor
    delta: Tensor | None


class CFGRecorder:
    """Put on a pipeline's ``encode_prompt`` for a ``guide`` block: records, per thread, the
    ``do_classifier_free_guidance`` each call passes (diffusers' text pipelines all do), which says
    whether this call's denoiser batch is [uncond, cond] or unbatched.

    The calls take turns (a lock): transformers' tokenizers keep their padding and truncation settings on
    the tokenizer while a call runs, so two threads encoding at once can get each other's settings
    (diffusers' ``encode_prompt`` tokenizes with ``padding="max_length"`` and then ``"longest"``; a
    prompt came back unpadded, 6 tokens instead of 77, about one run in three under load)."""

    def __init__(self, original):
        self.original = original
        self.signature = inspect.signature(original)
        self.__signature__ = self.signature  # what inspect.signature(pipe.encode_prompt) says meanwhile
        self._local = threading.local()
        self._lock = threading.RLock()

    def __call__(self, *args, **kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            flag = bound.arguments.get("do_classifier_free_guidance")
        except TypeError:
            flag = None
        if flag is not None:
            self._local.flag = bool(flag)
        self._local.calls = getattr(self._local, "calls", 0) + 1
        with self._lock:
            result = self.original(*args, **kwargs)
        if flag is not None:
            parts = result if isinstance(result, (tuple, list)) else (result,)
            self._local.returned = tuple(p for p in parts if isinstance(p, Tensor))
        return result

    def flag(self) -> bool | None:
        """This thread's last recorded flag (None: none recorded)."""
        return getattr(self._local, "flag", None)

    def returned(self) -> tuple[Tensor, ...]:
        """The tensors this thread's last call with a recorded flag returned (the prompt's embeddings
        first, then the negative prompt's and the rest, as diffusers' ``encode_prompt`` orders them)."""
        return getattr(self._local, "returned", ())

    def take_calls(self) -> int:
        """How many ``encode_prompt`` calls this thread made since the last ``take_calls`` (a pipeline
        with CFG as separate calls encodes twice per pipeline call: the prompt and the negative one)."""
        calls = getattr(self._local, "calls", 0)
        self._local.calls = 0
        return calls


class GuidedForward:
    """The ``forward`` that :func:`guide` puts on the denoiser for the ``with`` block: the guidance passes
    of one step, answered in the layout the pipeline asked for. Threads the block does not guide get the
    original forward. Packed 2x2 token latents (Flux: ``img_ids`` given) are unpacked into the image
    latent the engine works on, and the answer is packed again."""

    def __init__(
        self,
        module: nn.Module,
        original,
        guider: Guider,
        pipe: Any,
        layout: str,
        recorder: CFGRecorder | None,
    ):
        inner = getattr(module, "_orig_mod", module)  # a torch.compile wrapper's forward is (*args, **kw)
        # the class's forward: the instance's may be a wrapper already (the modular guider's dispatcher)
        params = list(inspect.signature(type(inner).forward).parameters)[1:]
        self.sample_arg = params[0]  # "sample" (UNets), "hidden_states" (transformers)
        self.timestep_arg = "timestep" if "timestep" in params else params[1]
        self.module, self.original, self.guider = module, original, guider
        self.pipe, self.layout, self.recorder = pipe, layout, recorder
        self.cfg_weight: float | None = None  # w for a CFG rule on a bare denoiser (a pipeline's: per call)
        self.at_step: tuple[int, int] | None = None  # the calls' place in their run, given by the caller
        self.separate_cfg = type(inner).__name__ in SEPARATE_CFG_MODELS
        # the step's place is needed by windows and by a CFG rule (its window, its state, zero-init steps)
        self.windowed = guider.rule is not None or any(t.window != (0.0, 1.0) for t in guider.terms.values())
        self._position = _Position()

    def __call__(self, *args, **kwargs):
        if not self.guider.guides_this_thread():  # unguided, once no guided step is running
            return self._unguided(*args, **kwargs)
        sample, args = (args[0], args[1:]) if args else (kwargs.pop(self.sample_arg), ())
        if args:  # diffusers denoisers take (sample, timestep, ...); keep the timestep as a keyword
            kwargs[self.timestep_arg] = args[0]
            args = args[1:]
        if args:
            raise TypeError("attnguide.guide: pass the denoiser's arguments after the timestep by keyword")
        t = kwargs.pop(self.timestep_arg)
        return_dict = kwargs.pop("return_dict", True)
        total = sample.shape[0]
        layout = self._cfg_layout(sample, kwargs)
        rows = branch_rows("none" if layout == "separate" else layout, total)
        grid = self._token_grid(sample, kwargs)
        x = unpack_2x2(sample, grid) if grid is not None else sample
        t0 = torch.as_tensor(t)
        t0 = t0.reshape(-1)[0] if t0.ndim > 0 else t0  # the step's timestep, as the engine takes it
        per_row_t = isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == total
        step, num_steps = self._step_of(t0)
        frames = sample.shape[2] if sample.ndim == 5 else 1

        def passes(**options) -> StepOutputs:
            return self.guider.passes(
                self._model_fn(kwargs, rows, total, per_row_t, frames, grid),
                x[rows["cond"]],
                t0,
                step=step,
                num_steps=num_steps,
                inputs_key=_inputs_key(kwargs),
                image_tokens=sample.shape[1] if grid is not None else 0,
                guidance_scale=self._rule_weight(),
                memory=self._position.memory,
                **options,
            )

        pack = pack_2x2 if grid is not None else (lambda v: v)
        if layout == "separate":
            out = self._separate_call(passes, sample, t0, pack)
        else:
            out = pack(self._assemble(passes(cfg="uncond" in rows), rows, total))
        return _wrap_output(out, return_dict)

    def _rule_weight(self) -> float | None:
        """The CFG weight w a CFG rule works with: the pipeline's at this call (its ``guidance_scale``
        attribute, else the ``guidance_scale`` argument of its running ``__call__``), else ``guide``'s."""
        if self.guider.rule is None:
            return None
        w = None
        if self.pipe is not None:
            w = _cfg_weight(self.pipe) or _call_argument(self.pipe, "guidance_scale")
        return w if w is not None else self.cfg_weight

    def _unguided(self, *args, **kwargs):
        with self.guider.step_lock:
            return self.original(*args, **kwargs)

    def _cfg_layout(self, sample: Tensor, kwargs: dict) -> str:
        """This call's CFG layout: the block's, else what the pipeline call showed (see module text).
        Pipelines with CFG as separate calls (:data:`SEPARATE_CFG_MODELS`) use "separate" where their
        call encoded two prompts (the prompt and the negative one), else "none"."""
        self._position.branch = None
        if self.layout != "auto":
            return self.layout
        if self.separate_cfg:
            calls = self.recorder.take_calls() if self.recorder is not None else 0
            if calls:  # the first denoiser call of a pipeline call
                self._position.separate = "separate" if calls >= 2 else "none"
            return self._position.separate
        recorded = self.recorder.flag() if self.recorder is not None else None
        if recorded and self._calls_per_branch(sample):
            self._position.branch = self._branch_of_call(kwargs)
            refuse_in_separate_calls(self.guider.terms, self.module)
            return "separate"
        return resolve_cfg_layout(self.layout, self.pipe, self.module, sample, kwargs, recorded)

    def _prompt_and_twins(self) -> tuple[Tensor | None, list[Tensor]]:
        """What this thread's ``encode_prompt`` returned: the prompt's embeddings (first) and the tensors
        of their shape beside them (the negative prompt's)."""
        returned = self.recorder.returned()
        if not returned:
            return None, []
        prompt = returned[0]
        return prompt, [r for r in returned[1:] if r.shape == prompt.shape]

    def _calls_per_branch(self, sample: Tensor) -> bool:
        """Whether this pipeline call makes CFG as two denoiser calls per step (Wan, Lumina2, CogView4):
        ``encode_prompt`` returned a negative of the prompt embeddings' shape, and the denoiser batch is
        the prompt's, not twice it (a batched pipeline concatenates the two)."""
        prompt, twins = self._prompt_and_twins()
        return bool(twins) and prompt.ndim > 0 and sample.shape[0] == prompt.shape[0]

    def _branch_of_call(self, kwargs: dict) -> str | None:
        """Which CFG branch this call of a two-call pipeline is, from the conditioning it carries: "cond"
        (the prompt's embeddings), "uncond" (the negative's), None where both are equal (then the calls'
        order says: conditional first). ValueError naming ``cfg_layout`` where the call carries neither."""
        prompt, twins = self._prompt_and_twins()
        for value in kwargs.values():
            if not isinstance(value, Tensor) or value.shape != prompt.shape:
                continue
            cond, uncond = _same(value, prompt), any(_same(value, r) for r in twins)
            if cond or uncond:
                return None if cond and uncond else ("cond" if cond else "uncond")
        raise ValueError(
            f"`cfg_layout`: {type(self.pipe).__name__} calls the denoiser once per CFG branch, and attnguide "
            "cannot tell which call carries the prompt (its conditioning is not what encode_prompt "
            "returned); pass cfg_layout='separate' if the conditional call comes first in each step"
        )

    @staticmethod
    def _token_grid(sample: Tensor, kwargs: dict) -> tuple[int, int] | None:
        """The token grid of packed 2x2 latents (B, tokens, 4C), read from ``img_ids``; None for image
        and video latents."""
        ids = kwargs.get("img_ids")
        if sample.ndim != 3 or not isinstance(ids, Tensor):
            return None
        return position_grid(ids, sample.shape[1])

    def _separate_call(self, passes: Callable[..., StepOutputs], sample: Tensor, t0: Tensor, pack) -> Tensor:
        """One call of a step whose CFG branches come as two calls, conditional first. The conditional
        call runs the terms whose ``separate_call`` is "cond" (the perturbations) and returns c + d; the
        unconditional one runs those whose ``separate_call`` is "uncond": SAG (its map and reference are
        the unconditional prediction, as Eq. 16 and diffusers' SAG pipeline) and adds d_sag to the
        conditional answer in place, which the pipeline still holds, then returns u + d. The pipeline's
        u' + w (c' - u') is then u + w (c - u) + d: each term once, whatever w."""
        pos = self._position
        pending = pos.pending
        pos.pending = None
        twin = pending is not None and torch.equal(pending.t, t0) and _same(sample, pending.sample)
        if pos.branch == "uncond" and not twin:
            raise ValueError(
                f"`cfg_layout`: {type(self.pipe).__name__} makes its unconditional call before the "
                "conditional one; attnguide.guide needs the conditional call first"
            )
        if pos.branch == "cond" or not twin:
            r = passes(cfg=False, call="cond")
            delta = r.terms_delta() if r.deltas else None  # the perturbation terms: this call's only
            returned = pack(_with_variance(r.out_cond if delta is None else r.out_cond + delta, r.variance))
            pos.pending = _Pending(sample, t0, returned, delta)
            return returned
        r = passes(cfg=False, call="uncond")
        delta = pending.delta
        if r.deltas:
            d_sag = r.terms_delta()  # SAG: this call's only term
            zeros = None if r.variance is None else torch.zeros_like(r.variance)
            pending.returned.add_(pack(_with_variance(d_sag, zeros)))
            delta = d_sag if delta is None else delta + d_sag
        guided = r.out_cond if delta is None else r.out_cond + delta
        return pack(_with_variance(guided, r.variance))

    def _step_of(self, t: Tensor) -> tuple[int, int]:
        """(step, number of steps) of this call within the calling thread's current pipeline call: the
        timestep's place in the schedule (or, for a pipeline that hands the denoiser rescaled timesteps,
        the scheduler's step index), counted from where this pipeline call started (img2img starts
        late), so a window restarts at each pipeline call. Only computed where a window needs it."""
        if self.at_step is not None:
            return self.at_step
        scheduler = self.guider.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        n = len(timesteps) if timesteps is not None else 0
        if not self.windowed or n == 0:
            return 0, max(n, 1)
        pos = self._position
        hits = (timesteps == t.to(timesteps.device)).nonzero()
        idx = int(hits[0, 0]) if len(hits) else getattr(scheduler, "step_index", None)
        if idx is None:
            idx = getattr(scheduler, "begin_index", None)
        if idx is None:  # a timestep outside the schedule (a loop of one's own): count the calls
            pos.count += 1
            return pos.count - 1, n
        if pos.last is None or idx < pos.last:
            pos.start = idx
            pos.memory = {}
        pos.last = idx
        return idx - pos.start, n - pos.start

    def _model_fn(
        self,
        kwargs: dict,
        rows: dict[str, slice],
        total: int,
        per_row_t: bool,
        frames: int,
        grid: tuple[int, int] | None,
    ):
        """``model_fn(x, t, branches)`` of the engine: the original forward with each branch's rows of
        the pipeline's arguments (``frames`` rows per sample for video; position ids as they are), on
        packed tokens where the call's latents were packed (``grid``). It reads only its arguments and
        those tensors (CUDA-graph safe)."""
        positions = {k: v for k, v in kwargs.items() if k in POSITION_ARGS}
        per_row = {k: v for k, v in kwargs.items() if k not in POSITION_ARGS}

        own_branches = {t.branch: t for t in self.guider.terms.values() if t.branch != "cond"}

        def model_fn(x: Tensor, tt: Tensor, branches) -> Tensor:
            kw = _select_rows(per_row, [rows.get(b, rows["cond"]) for b in branches], total, frames)
            for i, b in enumerate(branches):
                if b not in rows:  # a term's own branch (NAG: the conditional rows, the negative prompt)
                    uncond = branches.index("uncond") if "uncond" in branches else None
                    kw = own_branches[b].branch_inputs(kw, i, len(branches), uncond)
            kw[self.timestep_arg] = tt.expand(x.shape[0]) if per_row_t else tt
            if grid is None:
                return self.original(x, return_dict=False, **kw, **positions)[0]
            out = self.original(pack_2x2(x), return_dict=False, **kw, **positions)[0]
            return unpack_2x2(out, grid)

        return model_fn

    def _assemble(self, r: StepOutputs, rows: dict[str, slice], total: int) -> Tensor:
        """The outputs for the pipeline's batch: each branch shifted so that its CFG gives the guided
        prediction (see the module docstring); a learned variance is the conditional pass's."""
        guided = r.combined(None)  # the terms on the conditional prediction; the pipeline applies CFG
        parts = {"cond": guided}
        if "uncond" in rows:
            uncond_first = rows["uncond"].start == 0  # diffusers' text pipelines, whose w we can read
            w = _cfg_weight(self.pipe) if uncond_first else None
            delta = guided - r.out_cond
            if w is not None:
                parts = {"cond": r.out_cond, "uncond": r.out_uncond - delta / (w - 1)}
            else:
                parts["uncond"] = r.out_uncond + delta
        out = guided.new_empty((total, *guided.shape[1:]))
        for name, sl in rows.items():
            out[sl] = parts[name]
        if r.variance is not None:
            var = r.variance.new_empty((total, *r.variance.shape[1:]))
            for sl in rows.values():
                var[sl] = r.variance
            out = torch.cat([out, var], dim=1)
        return out


def _with_variance(prediction: Tensor, variance: Tensor | None) -> Tensor:
    """A model output: the prediction, and a learned variance where the model has one."""
    return prediction if variance is None else torch.cat([prediction, variance], dim=1)


def _wrap_output(sample: Tensor, return_dict: bool):
    """What diffusers denoisers return: a tuple, or an output object with ``.sample``."""
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _denoiser_of(target: Any, scheduler: Any) -> tuple[Any, nn.Module, Any]:
    """(pipeline or None, the denoiser module, the scheduler) of a guide() target."""
    if isinstance(target, nn.Module):
        if scheduler is None:
            raise ValueError("`scheduler` is required when guiding a bare denoiser module")
        return None, target, scheduler
    module = getattr(target, "unet", None)
    if module is None:  # not ``or``: bool() of a torch.compile wrapper raises
        module = getattr(target, "transformer", None)
    if module is None:
        raise ValueError(
            f"`target`: {type(target).__name__} has neither a `unet` nor a `transformer` to guide"
        )
    return target, module, scheduler or target.scheduler


#: Pipelines whose denoiser output is not the scheduler's prediction, so a term that reads eps / x0 from
#: it (SAG, classifier guidance) cannot guide them (PAG, which only compares two outputs, still works).
PREDICTION_UNREADABLE = {
    "StableDiffusionLatentUpscalePipeline": "its UNet output is preconditioned (c_skip / c_out), not the "
    "scheduler's eps / v / x0",
}


def cfg_layout_knowable(pipe: Any, module: nn.Module) -> bool:
    """Whether "auto" can find the CFG branches of ``pipe``'s denoiser calls (see resolve_cfg_layout)."""
    if callable(getattr(pipe, "encode_prompt", None)) or hasattr(type(pipe), "do_classifier_free_guidance"):
        return True
    if getattr(getattr(module, "config", None), "num_embeds_ada_norm", None) is not None:
        return True  # DiT: [cond, null label]
    return "guidance_scale" not in inspect.signature(type(pipe).__call__).parameters


#: Pipelines attnguide cannot guide at all, and why.
UNSUPPORTED = {
    "FluxKontextPipeline": "it appends the reference image's tokens to the denoised ones, which attnguide "
    "does not place yet",
    "FluxKontextInpaintPipeline": "it appends the reference image's tokens to the denoised ones, which "
    "attnguide does not place yet",
}


def refuse_in_separate_calls(terms: dict[str, Term], module: nn.Module) -> None:
    """ValueError for a term that cannot ride where the CFG branches come in separate denoiser calls
    (the classifier term, the CFG rules: the pipeline combines the two calls itself)."""
    for key, term in terms.items():
        if term.separate_call is None:
            raise ValueError(
                f"`{key}`: attnguide.guide cannot add {term.title} where the CFG branches come in separate "
                f"denoiser calls ({type(module).__name__}); use a pipeline that batches them"
            )


def _check_terms(terms: dict[str, Term], pipe: Any, module: nn.Module, cfg_layout: str) -> None:
    """ValueError for a pipeline attnguide cannot guide and for a term that cannot act on this target:
    one that reads the prediction where the denoiser output is not the scheduler's, one that cannot ride
    in a separate CFG call, one whose window ``guide`` cannot apply."""
    mro = [cls.__name__ for cls in type(pipe).__mro__] if pipe is not None else []
    for name in mro:
        if name in UNSUPPORTED:
            raise ValueError(f"`target`: attnguide cannot guide {name}: {UNSUPPORTED[name]}")
    separate = cfg_layout == "separate" or (
        cfg_layout == "auto" and type(getattr(module, "_orig_mod", module)).__name__ in SEPARATE_CFG_MODELS
    )
    if separate:
        refuse_in_separate_calls(terms, module)
    for key, term in terms.items():
        unreadable = [n for n in mro if n in PREDICTION_UNREADABLE]
        if term.reads_prediction and unreadable:
            why = PREDICTION_UNREADABLE[unreadable[0]]
            raise ValueError(f"`{key}`: {term.title} cannot guide {unreadable[0]}: {why}")
        if term.rule and cfg_layout == "none":
            raise ValueError(
                f"`{key}`: {term.title} is a CFG rule: it needs classifier-free guidance, and cfg_layout is "
                "'none'"
            )
        if not term.guide_window and term.window != (0.0, 1.0):
            raise ValueError(
                f"`{key}_window`: attnguide.guide applies {term.title} at every step; got {term.window} (use "
                "the engine's Guider with sample_loop for a window)"
            )


def packed_layout(module: nn.Module, scheduler: Any) -> LatentLayout | None:
    """The :class:`LatentLayout` of the unpacked latent of a denoiser with packed 2x2 token latents
    (:data:`PACKED_MODELS`: config channels / 4; Flux Control's 128 = 4 x (16 latent + 16 control)), or
    None for the others (the engine reads their config)."""
    inner = getattr(module, "_orig_mod", module)
    if type(inner).__name__ not in PACKED_MODELS:
        return None
    in_ch = inner.config.in_channels
    out_ch = getattr(inner, "out_channels", None) or in_ch
    if in_ch % 4 or out_ch % 4:
        raise ValueError(
            f"attnguide: packed 2x2 latents need channel counts divisible by 4, got {in_ch}/{out_ch}"
        )
    return LatentLayout.from_channels(in_ch // 4, out_ch // 4, variance=scheduler_takes_variance(scheduler))


@contextlib.contextmanager
def guide(
    target: Any,
    *,
    scheduler: Any = None,
    cfg_layout: str = "auto",
    record_masks: bool = False,
    cuda_graphs: bool = False,
    map_limits: MapLimits = DEFAULT_MAP_LIMITS,
    calling_thread_only: bool = False,
    guidance_scale: float | None = None,
    at_step: tuple[int, int] | None = None,
    **terms: Term | None,
) -> Iterator[Guider]:
    """Add guidance terms (every term of :data:`attnguide.engine.terms.TERMS`, by its name:
    ``sag=SAG(...)``, ``pag=PAG(...)``, ``apg=APG()``) to a pipeline (or a bare denoiser) for the block.

    target: a diffusers pipeline with a ``unet`` or ``transformer``, or a denoiser module (then
    ``scheduler`` is required: the one whose ``scale_model_input`` / timesteps your loop uses, and
    ``cfg_layout`` too).
    cfg_layout: how CFG branches sit in the denoiser's batch: "auto" (known for diffusers' pipelines: see
    the module text), "uncond_first", "cond_first", "none", or "separate" (no CFG batch: two denoiser
    calls per step, conditional first, with the same latents; Flux's ``true_cfg_scale``; the conditional
    answer is completed in place when the unconditional call arrives).
    classifier: a :class:`ClassifierGuidance` whose ``grad_fn`` closes over the labels (its shift is added
    once per step); not with CFG as separate calls, and without a step window for now.
    record_masks, cuda_graphs, map_limits: as for :class:`attnguide.Guider`.
    calling_thread_only: guide only the calls made by the thread that opened the block (attnguide's
    pipelines do this); other threads' calls of the denoiser meanwhile run unguided. Default: every
    thread's calls inside the block are guided, each with its own per-call state.
    guidance_scale: for a CFG rule (``apg=APG()``, ...) on a bare denoiser, the CFG weight w your loop
    applies; a pipeline's own ``guidance_scale`` is read at each call instead.
    at_step: (step, number of steps): where every call of the block sits in its sampling run, for the
    terms' windows, where the caller knows it (the modular-pipeline guider); default: read from the
    scheduler's timesteps at each call.
    The denoiser's ``forward``, the pipeline's ``encode_prompt`` and the attention processors are
    restored on exit, also on error. Yields the :class:`Guider` (its ``last_mask`` / ``mask_sum`` with
    ``record_masks``).
    """
    unknown = sorted(set(terms) - set(TERMS))
    if unknown:
        raise TypeError(f"guide() got unexpected keyword argument(s) {unknown}; the terms are {list(TERMS)}")
    guidance_scale = _check_options(
        cfg_layout,
        guidance_scale,
        at_step,
        record_masks=record_masks,
        cuda_graphs=cuda_graphs,
        calling_thread_only=calling_thread_only,
    )
    pipe, module, scheduler = _denoiser_of(target, scheduler)
    _check_terms(check_terms(terms), pipe, module, cfg_layout)
    if cfg_layout == "auto" and (pipe is None or not cfg_layout_knowable(pipe, module)):
        where = "a bare denoiser's batch" if pipe is None else f"the denoiser batch of {type(pipe).__name__}"
        raise ValueError(
            f"`cfg_layout`: where the classifier-free guidance branches sit in {where} cannot be known; "
            "pass cfg_layout='none' (no CFG), 'uncond_first' ([uncond, cond]) or 'cond_first'"
        )
    guider = Guider(
        module,
        scheduler,
        **terms,
        layout=packed_layout(module, scheduler),
        record_masks=record_masks,
        cuda_graphs=cuda_graphs,
        map_limits=map_limits,
        owner=threading.get_ident() if calling_thread_only else None,
    )
    # Without a term the pipeline's own call is the same computation; the forward still goes in where its
    # passes can be replayed from CUDA graphs (the speed-up applies to unguided and CFG-only runs too).
    first = next(module.parameters(), None)
    graphed = guider.graphs is not None and first is not None and first.is_cuda
    if not guider.terms and not graphed:
        yield guider
        return
    # The forward and the processors are replaced for the whole block, under the model's lock: another
    # block on the same model (any thread) waits for this one, scheduler state included.
    patched = _patched(module, pipe, guider, cfg_layout, (guidance_scale, at_step))
    with model_lock(getattr(module, "_orig_mod", module)), patched, guider:
        yield guider


def guided_call(
    target: Any,
    forward: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    *,
    at_step: tuple[int, int],
    **terms: Term,
) -> tuple[Any, StepOutputs | None]:
    """One denoiser call ``forward(*args, **kwargs)`` of ``target`` (a pipeline, or any object with the
    denoiser and ``scheduler``) guided by ``terms`` as one unbatched branch (cfg_layout "none") at
    ``at_step``, without replacing the denoiser's forward (only its attention processors and hooks, for
    this call, under the model's lock): the call's output and its :class:`StepOutputs` (each term's
    share). The modular-pipeline guider's entry; :func:`guide` is the one for whole pipeline calls."""
    pipe, module, scheduler = _denoiser_of(target, None)
    checked = check_terms(terms)
    _check_terms(checked, pipe, module, "none")
    guider = Guider(
        module, scheduler, **checked, layout=packed_layout(module, scheduler), owner=threading.get_ident()
    )
    with guider:
        call = GuidedForward(module, forward, guider, pipe, "none", None)
        call.at_step = at_step
        out = call(*args, **kwargs)
    return out, guider.last_outputs


def _check_options(
    cfg_layout: str, guidance_scale: float | None, at_step: Any, **flags: bool
) -> float | None:
    """ValueError for a bad ``cfg_layout``, flag, ``guidance_scale`` or ``at_step``; returns
    ``guidance_scale`` as a float."""
    if at_step is not None and not (
        isinstance(at_step, tuple)
        and len(at_step) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in at_step)
        and 0 <= at_step[0] < at_step[1]
    ):
        raise ValueError(
            f"`at_step` must be (step, number of steps) with 0 <= step < number, got {at_step!r}"
        )
    if not isinstance(cfg_layout, str) or cfg_layout not in CFG_LAYOUTS:
        raise ValueError(f"`cfg_layout` must be one of {CFG_LAYOUTS}, got {cfg_layout!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"`{name}` must be True or False, got {flag!r}")
    return None if guidance_scale is None else check_scale("guidance_scale", guidance_scale)


def _guide_signature() -> inspect.Signature:
    """guide()'s signature with each registered term as a keyword-only argument (``help``, IDEs)."""
    sig = inspect.signature(guide.__wrapped__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    kinds = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=f"{cls.__name__} | None"
        )
        for name, cls in TERMS.items()
    ]
    return sig.replace(parameters=params[:1] + kinds + params[1:])


guide.__signature__ = _guide_signature()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _patched(
    module: nn.Module, pipe: Any, guider: Guider, cfg_layout: str, given: tuple[float | None, Any]
) -> Iterator[None]:
    """The denoiser's forward (and the pipeline's ``encode_prompt``) replaced for a block, always put
    back; ValueError where an enclosing block of this thread already guides the denoiser."""
    if isinstance(module.__dict__.get("forward"), GuidedForward):
        raise ValueError(
            f"attnguide.guide: this {type(module).__name__} is already guided by an enclosing guide() block "
            "(or an attnguide pipeline call); put every term into one guide(...) call instead of nesting"
        )
    originals = {}
    recorder = None
    encode = getattr(pipe, "encode_prompt", None) if pipe is not None else None
    if callable(encode):
        originals["encode_prompt"] = (pipe, pipe.__dict__.get("encode_prompt"))
        recorder = CFGRecorder(encode)
        pipe.encode_prompt = recorder
    originals["forward"] = (module, module.__dict__.get("forward"))
    forward = GuidedForward(module, module.forward, guider, pipe, cfg_layout, recorder)
    forward.cfg_weight, forward.at_step = given
    module.forward = forward
    try:
        yield
    finally:
        for name, (owner, before) in originals.items():
            if before is not None:
                setattr(owner, name, before)
            else:
                delattr(owner, name)
