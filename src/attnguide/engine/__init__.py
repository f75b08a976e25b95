"""The guidance engine: terms and formulas, degradations, attention processors, the guided step.

Imports nothing of :mod:`attnguide.pipelines` or :mod:`attnguide.apps` (only torch and, for the
attention-module type, diffusers).
"""
