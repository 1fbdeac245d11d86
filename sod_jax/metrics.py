"""The stable public name of the at-k metrics (DESIGN §5): ``sod_jax.metrics.pass_at_k`` etc. The
code lives in :mod:`sod_jax.evaluation.metrics`."""

from sod_jax.evaluation.metrics import avg_at_k, bootstrap_metrics, maj_at_k, pass_at_k, validation_metrics

__all__ = ["avg_at_k", "bootstrap_metrics", "maj_at_k", "pass_at_k", "validation_metrics"]
