"""PPO policy loss (clip-higher, dual-clip, log-ratio clamp) and the diagnostics the trainer logs.

Per token: ``r = exp(clip(logp - old, -clamp, clamp))``,
``L = max(-adv * r, -adv * clip(r, 1 - clip_low, 1 + clip_high))`` and, for ``adv < 0`` with
dual-clip on, ``L = min(L, -adv * dual_clip)``.

Aggregation: ``token-mean`` = sum over masked tokens of the mini-batch / their count (the true
token mean; the reference averages micro-batch means instead); ``seq-mean-token-mean`` = mean over
rows with tokens of each row's token mean.

Rollout importance correction (:mod:`sod_jax.algo.rollout_correction`): optional constant weights
``is_weights [B, T]`` multiply ``L`` per token before aggregation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite stand-in for +inf (about fp32's largest value) in masked max/min: an empty selection
# gives a large finite number instead of inf, which JSON and plots handle.
BIG = 3.4e38


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def aggregate(loss_tok: jax.Array, mask: jax.Array, mode: str = "token-mean") -> jax.Array:
    """Reduce ``[B, T]`` token losses to a scalar (see module docstring)."""
    m = mask.astype(jnp.float32)
    x = jnp.where(m > 0, loss_tok, 0.0)
    if mode == "token-mean":
        return jnp.sum(x) / jnp.maximum(jnp.sum(m), 1.0)
    if mode == "seq-mean-token-mean":
        n = jnp.sum(m, axis=1)
        per_seq = jnp.sum(x, axis=1) / jnp.maximum(n, 1.0)
        has = (n > 0).astype(jnp.float32)
        return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; use token-mean or seq-mean-token-mean")


def ppo_token_loss(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, clip_low: float = 0.2,
                   clip_high: float = 0.28, dual_clip: float = 3.0, log_ratio_clamp: float = 20.0):
    """Token losses ``[B, T]`` and masks of which branch was taken (for clip fractions)."""
    log_ratio = jnp.clip(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    took_clip = clipped > unclipped
    took_dual = jnp.zeros_like(took_clip)
    if dual_clip:
        bound = -adv * dual_clip
        took_dual = (adv < 0) & (loss > bound)
        loss = jnp.where(adv < 0, jnp.minimum(loss, bound), loss)
    return loss, ratio, took_clip, took_dual


def ppo_loss(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, mask: jax.Array, *, clip_low: float = 0.2,
             clip_high: float = 0.28, dual_clip: float = 3.0, log_ratio_clamp: float = 20.0,
             loss_agg: str = "token-mean", is_weights=None) -> tuple[jax.Array, dict]:
    """Scalar PPO loss over masked tokens and its diagnostics. All inputs ``[B, T]``.

    Off-mask entries of ``old_logp`` and ``adv`` are replaced before use (not just masked after): a
    NaN or inf there would otherwise leak into the gradient through ``where``'s unselected branch.
    """
    on = mask > 0
    old_logp = jnp.where(on, old_logp, 0.0)
    adv = jnp.where(on, adv, 0.0)
    loss_tok, ratio, took_clip, took_dual = ppo_token_loss(logp, old_logp, adv, clip_low, clip_high, dual_clip,
                                                           log_ratio_clamp)
    if is_weights is not None:  # rollout importance correction (constants)
        loss_tok = loss_tok * jnp.where(on, jax.lax.stop_gradient(is_weights), 1.0)
    loss = aggregate(loss_tok, mask, loss_agg)
    m = mask.astype(bool)
    big = jnp.float32(BIG)
    metrics = {
        "pg_loss": loss,
        "clip_frac": masked_mean(took_clip, mask),
        "clip_frac_low": masked_mean(took_clip & (ratio < 1.0), mask),
        "clip_frac_high": masked_mean(took_clip & (ratio > 1.0), mask),
        "dual_clip_frac": masked_mean(took_dual, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": jnp.max(jnp.where(m, ratio, -big)),
        "ratio_min": jnp.min(jnp.where(m, ratio, big)),
        "approx_kl_old": masked_mean(old_logp - logp, mask),
    }
    return loss, metrics


def advantage_stats(adv_tok: jax.Array, mask: jax.Array) -> dict:
    mean = masked_mean(adv_tok, mask)
    m = mask.astype(bool)
    big = jnp.float32(BIG)
    return {"adv_mean": mean, "adv_std": jnp.sqrt(masked_mean((adv_tok - mean) ** 2, mask)),
            "adv_max": jnp.max(jnp.where(m, adv_tok, -big)), "adv_min": jnp.min(jnp.where(m, adv_tok, big))}


def kl_estimates(student_logp: jax.Array, teacher_logp: jax.Array, mask: jax.Array) -> dict:
    """Student-vs-teacher reverse KL estimates on student samples: k1 = s - q, k3 = e^(q-s) - (q-s) - 1."""
    d = jnp.where(mask > 0, teacher_logp - student_logp, 0.0)
    return {"kl_k1": masked_mean(-d, mask), "kl_k3": masked_mean(jnp.expm1(d) - d, mask)}


def step_weight_stats(step_weight: jax.Array, divergence: jax.Array, step_len: jax.Array,
                      report_steps: int = 16) -> dict:
    """Mean ``w_k`` and ``d_k`` per step index k = 1..report_steps, and overall ``d_k`` stats.
    Inputs ``[B, S]`` from :func:`sod_jax.algo.sod.step_stats`."""
    S = step_weight.shape[1]
    K = min(report_steps, S - 1)
    exists = step_len > 0
    n_k = jnp.sum(exists[:, 1:K + 1], axis=0)
    w_k = jnp.sum(jnp.where(exists, step_weight, 0.0)[:, 1:K + 1], axis=0) / jnp.maximum(n_k, 1)
    d_k = jnp.sum(jnp.where(exists, divergence, 0.0)[:, 1:K + 1], axis=0) / jnp.maximum(n_k, 1)
    ex = exists.at[:, 0].set(False)
    big = jnp.float32(BIG)
    return {"step_w_mean_by_k": w_k, "step_d_mean_by_k": d_k, "step_count_by_k": n_k,
           "d_mean": jnp.sum(jnp.where(ex, divergence, 0.0)) / jnp.maximum(jnp.sum(ex), 1),
           "d_max": jnp.max(jnp.where(ex, divergence, -big)),
           "w_mean": jnp.sum(jnp.where(ex, step_weight, 0.0)) / jnp.maximum(jnp.sum(ex), 1),
           "w_min": jnp.min(jnp.where(ex, step_weight, big))}

