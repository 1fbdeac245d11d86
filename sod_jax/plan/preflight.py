"""``compile.plan`` (``--plan TARGET`` on ``python -m sod_jax.train`` / ``sod_jax.sft``): plan the
run for a slice before any weights load, and refuse a config that will not fit.

The plan is :func:`sod_jax.plan.plan_config` of the resolved config: the run's real programs compiled
from abstract inputs for ``TARGET`` (a TPU slice through the compile-only client, the local GPUs, or
an arithmetic estimate for GPUs that are not here). A verdict of "does not fit" stops the run with
the planner's verdict and the knob values it found; a plan that cannot be made (an unknown target,
no libtpu) stops it too, since the user asked for the check. Every process makes the same plan
(deterministic compiles, no cross-host traffic), and process 0 writes it to ``<out_dir>/plan.json``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sod_jax import paths

log = logging.getLogger(__name__)


class PlanRefusal(ValueError):
    """The pre-flight plan says the run will not fit (or could not be made)."""


def preflight_plan(cfg: Any, *, job: str, out_dir: str, is_main: bool, source: str = "config") -> Optional[Any]:
    """The :class:`~sod_jax.plan.report.PlanReport` of ``cfg.compile.plan`` (None when it is empty).

    Raises :class:`PlanRefusal` when the plan says the run does not fit, or cannot be made."""
    target = (cfg.compile.plan or "").strip()
    if not target:
        return None
    from sod_jax.plan.build import PlanError
    from sod_jax.plan.core import plan_config
    from sod_jax.plan.hardware import TargetError

    log.info("compile.plan=%s: compiling the run's programs for it from abstract inputs ...", target)
    try:
        report = plan_config(cfg, target, job=job, source=source)
    except (PlanError, TargetError, KeyError) as e:
        raise PlanRefusal(f"compile.plan={target}: the plan could not be made: {e} "
                          "(fix the target, or set compile.plan='' to skip the check)") from None
    if is_main:
        out = paths.as_path(out_dir)
        paths.makedirs(out)
        (out / "plan.json").write_text(report.to_json())
    if report.fits is False:
        found = [f"{k['key']}={k['value']}" for k in report.knobs
                 if k.get("value") is not None and f"{k['key']}={k['value']}" not in report.verdict]
        hint = f"; values that fit: {' '.join(found)}" if found else ""
        raise PlanRefusal(f"compile.plan={target}: {report.verdict}{hint} (the full report: python -m sod_jax.plan "
                          f"--topology {target} with this run's config and overrides; no weights were loaded)")
    resident = max(report.memory.get("resident_update") or 0, report.memory.get("resident_rollout") or 0)
    log.info("compile.plan=%s: %s (%.2f GiB per chip resident at most; %s)", target, report.verdict,
             resident / 2**30, report.method)
    return report


__all__ = ["PlanRefusal", "preflight_plan"]
