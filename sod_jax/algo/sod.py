"""SOD step weights (DESIGN §1.1) as a segment sum: no Python loop over tokens or steps.

A *step* is a maximal run of ``m == 1`` in a row (one assistant turn); steps are numbered 1..K.
``d_k`` is the mean ``|s - q|`` over step k's tokens and

    w_1 = 1,   w_k = min( prod_{u<k} (d_u + eps) / (d_{u+1} + eps), 1 + delta )   for k >= 2.

The running product telescopes to ``(d_1 + eps) / (d_k + eps)``; the clip applies only to the
output, never inside the product. Every token of step k gets ``w_k``; tokens outside steps get 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class StepStats(NamedTuple):
    """Per-token weights and per-step quantities (step index k is column k; column 0 is unused)."""

    weights: jax.Array  # [B, T] w of each token's step, 0 outside steps
    step_ids: jax.Array  # [B, T] int, 1..K inside steps, 0 outside
    divergence: jax.Array  # [B, S] d_k (0 for steps that do not exist)
    step_weight: jax.Array  # [B, S] w_k (0 for steps that do not exist)
    step_len: jax.Array  # [B, S] tokens per step
    num_steps: jax.Array  # [B] K_i


def max_steps(T: int) -> int:
    """Number of step slots needed for rows of length T (at most ceil(T/2) runs), plus slot 0."""
    return (T + 1) // 2 + 1


def step_ids(mask: jax.Array) -> jax.Array:
    """``[B, T]`` 1-based index of each token's step (run of ones), 0 where ``mask == 0``."""
    m = mask.astype(bool)
    prev = jnp.pad(m[:, :-1], ((0, 0), (1, 0)))
    starts = m & ~prev
    return jnp.cumsum(starts.astype(jnp.int32), axis=1) * m


def per_step_sum(x: jax.Array, ids: jax.Array, num_slots: int) -> jax.Array:
    """Sum ``x [B, T]`` into ``[B, num_slots]`` by per-row step id (one flat segment sum)."""
    B, T = x.shape
    flat_ids = (ids + jnp.arange(B, dtype=ids.dtype)[:, None] * num_slots).reshape(-1)
    return jax.ops.segment_sum(x.reshape(-1), flat_ids, num_segments=B * num_slots).reshape(B, num_slots)


@jax.jit
def step_stats(student_logp: jax.Array, teacher_logp: jax.Array, response_mask: jax.Array,
               eps: float = 1e-6, delta: float = 0.2) -> StepStats:
    """All SOD step quantities. Inputs ``[B, T]``; ``response_mask`` 1 on model-generated tokens."""
    B, T = response_mask.shape
    S = max_steps(T)
    m = response_mask.astype(jnp.float32)
    ids = step_ids(response_mask)
    # Padding and tool tokens may hold anything (even NaN); they never enter a step.
    gap = jnp.where(m > 0, jnp.abs(student_logp.astype(jnp.float32) - teacher_logp.astype(jnp.float32)), 0.0)
    sums = per_step_sum(gap, ids, S)
    lens = per_step_sum(m, ids, S)
    exists = (lens > 0) & (jnp.arange(S)[None, :] > 0)
    d = jnp.where(exists, sums / jnp.maximum(lens, 1.0), 0.0)  # [B, S]
    ratio = (d[:, 1:2] + eps) / (d + eps)  # telescoped running product
    w = jnp.where(jnp.arange(S)[None, :] == 1, 1.0, jnp.minimum(ratio, 1.0 + delta))
    w = jnp.where(exists, w, 0.0)
    tok_w = jnp.take_along_axis(w, ids, axis=1) * m
    return StepStats(tok_w, ids, d, w, lens, jnp.max(ids, axis=1))


def step_weights(student_logp: jax.Array, teacher_logp: jax.Array, response_mask: jax.Array,
                 eps: float = 1e-6, delta: float = 0.2) -> jax.Array:
    """Per-token SOD weights ``[B, T]`` (see module docstring)."""
    return step_stats(student_logp, teacher_logp, response_mask, eps, delta).weights
