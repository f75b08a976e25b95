"""Scheduler choice by name, built from a model's own scheduler configuration."""

from __future__ import annotations

import diffusers

# name -> (diffusers class, config overrides)
SCHEDULER_NAMES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "dpm_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def scheduler_from_name(name: str, config) -> diffusers.SchedulerMixin:
    """A scheduler of kind ``name`` (see ``SCHEDULER_NAMES``) built from ``config`` (a scheduler config
    dict or a scheduler), so the training noise schedule is kept. ValueError for an unknown name."""
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULER_NAMES)}, got {name!r}")
    cls_name, overrides = SCHEDULER_NAMES[name]
    cfg = dict(getattr(config, "config", config))
    cfg.update(overrides)
    return getattr(diffusers, cls_name).from_config(cfg)
