"""IW-OPD: importance-weighted (position-weighted) on-policy distillation, per token.

From TRL's ``IWOPDTrainer._compute_iw_opd_loss`` (``trl/experimental/iw_opd/iw_opd_trainer.py``;
Xie et al., "On the Position Bias of On-Policy Distillation", arXiv 2606.22600). With the
distillation advantage ``a[t] = (q[t] - s[t]) * m[t]`` of each sampled response token:

    P[t] = sum_{u < t} |a[u]|                     (exclusive prefix sum along the row)
    Z    = max(sum_u |a[u]|, epsilon)
    w[t] = 1 + gamma * (1 - P[t] / Z)

so a row's first tokens get ``1 + gamma`` and the weight falls towards 1 as the accumulated
teacher-student discrepancy grows: later tokens, whose supervision has drifted, count less. It is the
closest published relative of SOD's step weights (per token and monotone, where SOD is per tool
turn and restores the weight when the student recovers). Tool tokens and padding (``m == 0``)
contribute nothing to ``P`` or ``Z`` and get weight 0. TRL's defaults: gamma 0.5, epsilon 1e-8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sod_jax.algo.losses import BIG


@jax.jit
def iw_opd_weights(student_logp: jax.Array, teacher_logp: jax.Array, response_mask: jax.Array,
                   gamma: float = 0.5, epsilon: float = 1e-8) -> jax.Array:
    """Per-token IW-OPD weights ``[B, T]`` (see module docstring); 0 where ``response_mask == 0``.

    ``student_logp``/``teacher_logp`` ``[B, T]``: log-probs of the sampled tokens under the policy that
    sampled them and under the teacher; off-mask entries may hold anything (even NaN).
    """
    m = response_mask.astype(jnp.float32)
    gap = jnp.where(m > 0, jnp.abs(teacher_logp.astype(jnp.float32) - student_logp.astype(jnp.float32)), 0.0)
    prefix = jnp.cumsum(gap, axis=1) - gap  # [B, T] sum of |a| strictly before t
    total = jnp.maximum(jnp.sum(gap, axis=1, keepdims=True), epsilon)  # [B, 1]
    return (1.0 + gamma * (1.0 - prefix / total)) * m


def iw_opd_stats(weights: jax.Array, response_mask: jax.Array) -> dict:
    """Mean / min / max weight over response tokens (TRL logs the same as ``iw_opd/*_weight``)."""
    on = response_mask > 0
    n = jnp.maximum(jnp.sum(on), 1)
    big = jnp.float32(BIG)
    return {"iw_opd/mean_weight": jnp.sum(jnp.where(on, weights, 0.0)) / n,
            "iw_opd/min_weight": jnp.min(jnp.where(on, weights, big)),
            "iw_opd/max_weight": jnp.max(jnp.where(on, weights, -big))}
