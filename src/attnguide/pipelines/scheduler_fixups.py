"""The scheduler-config fix-ups diffusers pipelines make in ``__init__``: an outdated ``steps_offset``,
``clip_sample`` or ``skip_prk_steps`` is corrected in the scheduler's config, in place.

A drop-in runs its diffusers parent's ``__init__``, whose fix-ups can differ from those of the pipeline it
replaces: diffusers' SAG pipeline makes none where ``StableDiffusionPipeline`` fixes ``steps_offset`` and
``clip_sample``, and ``StableDiffusionPAGInpaintPipeline`` fixes ``clip_sample`` where
``StableDiffusionInpaintPipeline`` fixes ``skip_prk_steps``. With a default ``DDIMScheduler()``
(``steps_offset=0``, ``clip_sample=True``) that changes every sample, so a drop-in makes the fix-ups of
the pipeline it replaces (:func:`only_fixups`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from diffusers.configuration_utils import FrozenDict

#: name -> (whether a config needs the fix, tested as diffusers' pipelines test it; the fixed value)
FIXUPS: dict[str, tuple[Callable[[Mapping[str, Any]], bool], Any]] = {
    "steps_offset": (lambda config: config.get("steps_offset", 1) != 1, 1),
    "clip_sample": (lambda config: config.get("clip_sample", False) is True, False),
    "skip_prk_steps": (lambda config: config.get("skip_prk_steps", True) is False, True),
}


@contextlib.contextmanager
def only_fixups(scheduler: Any, names: Sequence[str]) -> Iterator[None]:
    """Around a diffusers ``__init__``: on exit ``scheduler``'s config is the one it had on entry with only
    the fix-ups ``names`` (keys of :data:`FIXUPS`) made, each with diffusers' FutureWarning; the warnings
    of the fix-ups the ``__init__`` made itself are silenced."""
    unknown = set(names) - set(FIXUPS)
    if unknown:
        raise ValueError(f"unknown scheduler fix-ups {sorted(unknown)}; known: {sorted(FIXUPS)}")
    config = getattr(scheduler, "_internal_dict", None)
    if config is None:  # no scheduler
        yield
        return
    before = dict(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The configuration file of this scheduler", FutureWarning)
        yield
    if dict(scheduler._internal_dict) != before:
        scheduler._internal_dict = FrozenDict(before)
    for name in names:  # as diffusers makes each fix-up (its message, formatting the scheduler, included)
        needs_fix, value = FIXUPS[name]
        if needs_fix(scheduler.config):
            warnings.warn(
                f"The configuration file of this scheduler: {scheduler} has `{name}="
                f"{scheduler.config.get(name)!r}`; it is set to {value!r}, as diffusers' pipeline does. "
                "Please update the scheduler config.",
                FutureWarning,
                stacklevel=4,
            )
            scheduler._internal_dict = FrozenDict({**scheduler.config, name: value})


def init_with_scheduler_fixups(base_init: Callable[..., None], names: Sequence[str]) -> Callable[..., None]:
    """``base_init`` (same signature) making the scheduler fix-ups ``names`` instead of its own."""
    signature = inspect.signature(base_init)

    @functools.wraps(base_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        scheduler = signature.bind(self, *args, **kwargs).arguments.get("scheduler")
        with only_fixups(scheduler, names):
            base_init(self, *args, **kwargs)

    return __init__
