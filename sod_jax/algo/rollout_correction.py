"""Rollout importance correction: sampler/trainer mismatch of the sampled tokens' log-probs.

The tokens are sampled by the rollout engine (``sampler_logp``: what it reported; bf16 decode on
TPU/GPU, a weight copy that may be stale) but the PPO ratio is taken against ``old_logp``, the
trainer's recomputation with the same weights. When the two differ the policy gradient is biased;
truncated importance sampling (TIS) re-weights each token's policy loss by

    token:     rho[b, t] = min(exp(old[b, t] - sampler[b, t]), cap)
    sequence:  rho[b]    = min(exp(sum_t m[b, t] * (old[b, t] - sampler[b, t])), cap)   (every token of row b)

as verl's rollout correction (``rollout_is``, ``rollout_is_threshold``) and TRL's sampler-mismatch
correction (``vllm_importance_sampling_mode`` = ``token_truncate`` / ``sequence_truncate``) do. The
weights are constants (no gradient) that multiply the per-token PPO loss before aggregation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LEVELS = ("none", "token", "sequence")


class RolloutIS(NamedTuple):
    weights: jax.Array  # [B, T] truncated importance weight of each token (1 off-mask; ones for "none")
    metrics: dict  # rollout_is/mean, rollout_is/clipped_frac (over tokens, or rows for "sequence")


def rollout_is_weights(old_logp: jax.Array, sampler_logp: jax.Array, response_mask: jax.Array,
                       level: str = "token", cap: float = 2.0) -> RolloutIS:
    """Truncated importance weights of ``level`` (see module docstring). Inputs ``[B, T]``.

    ``rollout_is/mean``: mean weight over response tokens (token level) or over rows with response
    tokens (sequence level); ``rollout_is/clipped_frac``: the fraction of those whose raw weight
    exceeded ``cap``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown rollout_is level {level!r}; use one of {', '.join(LEVELS)}")
    on = response_mask > 0
    m = on.astype(jnp.float32)
    if level == "none":
        return RolloutIS(jnp.ones_like(m), {})
    log_ratio = jnp.where(on, old_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32), 0.0)
    if level == "sequence":
        log_ratio = jnp.sum(log_ratio, axis=1, keepdims=True)  # [B, 1]
        counted = (jnp.sum(m, axis=1, keepdims=True) > 0).astype(jnp.float32)  # rows with tokens
    else:
        counted = m
    raw = jnp.exp(log_ratio)
    w = jnp.minimum(raw, cap)
    n = jnp.maximum(jnp.sum(counted), 1.0)
    metrics = {"rollout_is/mean": jnp.sum(w * counted) / n,
               "rollout_is/clipped_frac": jnp.sum((raw > cap) * counted) / n}
    w = jnp.broadcast_to(w, m.shape)
    return RolloutIS(jax.lax.stop_gradient(jnp.where(on, w, 1.0)), metrics)


def mismatch_stats(old_logp: jax.Array, sampler_logp: jax.Array, response_mask: jax.Array) -> dict:
    """Mean and max ``|sampler_logp - old_logp|`` over response tokens (0 when there are none)."""
    on = response_mask > 0
    d = jnp.where(on, jnp.abs(sampler_logp.astype(jnp.float32) - old_logp.astype(jnp.float32)), 0.0)
    return {"rollout_mismatch/mean": jnp.sum(d) / jnp.maximum(jnp.sum(on), 1),
            "rollout_mismatch/max": jnp.max(d)}
