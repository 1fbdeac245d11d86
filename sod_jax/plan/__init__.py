"""Capacity planning without the hardware: compile a config's real programs for a TPU slice (or
estimate a GPU count) and say what fits. ``python -m sod_jax.plan --help``; from Python,
:func:`plan_config` returns a :class:`PlanReport`.

Importing this package does not import JAX (the CLI chooses JAX's platforms first); the names
below load their modules on first use.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "plan_config": "sod_jax.plan.core",
    "PlanError": "sod_jax.plan.build",
    "PlanReport": "sod_jax.plan.report",
    "format_text": "sod_jax.plan.report",
    "Target": "sod_jax.plan.hardware",
    "TargetError": "sod_jax.plan.hardware",
    "parse_target": "sod_jax.plan.hardware",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sod_jax.plan' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = ["PlanError", "PlanReport", "Target", "TargetError", "format_text", "parse_target", "plan_config"]
