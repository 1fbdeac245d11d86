"""Outcome and distillation advantages for every mode of DESIGN §1.2 (pure, vectorised).

Modes (``m`` = response mask, ``s``/``q`` = student/teacher log-probs of the sampled tokens,
``A`` = GRPO advantage of the trajectory, ``c`` = ``opd_coef``, ``w`` = SOD step weights):

=============  ============================================================
``grpo``       ``A * m``
``opd``        ``A * m + c * (q - s) * m``   (``grpo_term=False`` drops ``A * m``)
``sod``        ``A * m + c * w * (q - s) * m``   (same switch)
``iw_opd``     as ``sod`` with ``w`` = the per-token IW-OPD weights (:mod:`sod_jax.algo.iw_opd`)
``gated_opd``  ``A * m + beta * (q - s) * m``,  ``beta = bmin + (bmax - bmin) * sigmoid(-gamma * A)``;
               ``bmax <= bmin`` drops the distillation term (``A * m``), as the reference does
``opsd_*``     as ``opd``; ``q`` comes from the student itself (stop-gradient) on a prompt holding
               privileged text, aligned on the response tokens by the caller.
=============  ============================================================
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

MODES = ("grpo", "opd", "sod", "gated_opd", "opsd_gt", "opsd_hint", "iw_opd")
TEACHER_MODES = ("opd", "sod", "gated_opd", "opsd_gt", "opsd_hint", "iw_opd")  # modes that need q
WEIGHTED_MODES = ("sod", "iw_opd")  # modes whose distillation term carries per-token weights


class GroupStats(NamedTuple):
    advantage: jax.Array  # [B] A_i
    mean: jax.Array  # [B] group mean of each row's group
    std: jax.Array  # [B] unbiased group std (1 for groups of one)
    zero_variance: jax.Array  # [B] bool: the row's group has identical rewards (A = 0)


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, num_groups: int, eps: float = 1e-6,
                    valid: Optional[jax.Array] = None) -> GroupStats:
    """``A_i = (R_i - mean_g) / (std_g + eps)`` with the unbiased std; a group of one has mean 0, std 1.

    ``rewards [B]`` float, ``group_ids [B]`` int in ``[0, num_groups)`` (rows of one prompt share an id),
    ``valid [B]`` bool (False on padded rows; default all True). A padded row, or a row whose id is
    outside ``[0, num_groups)`` (e.g. ``-1``), joins no group: it changes no group's statistics
    (its reward may even be NaN) and gets advantage 0.
    """
    r = rewards.astype(jnp.float32)
    real = (group_ids >= 0) & (group_ids < num_groups)
    if valid is not None:
        real &= valid.astype(bool)
    # Rows without a group go to one extra segment that is never read back as a real group (an id
    # of -1 would otherwise wrap around to the last group in the gathers below).
    gid = jnp.where(real, group_ids, num_groups)
    r = jnp.where(real, r, 0.0)
    count = jax.ops.segment_sum(real.astype(jnp.float32), gid, num_segments=num_groups + 1)
    total = jax.ops.segment_sum(r, gid, num_segments=num_groups + 1)
    mean_g = total / jnp.maximum(count, 1.0)
    sq = jax.ops.segment_sum(jnp.where(real, (r - mean_g[gid]) ** 2, 0.0), gid, num_segments=num_groups + 1)
    std_g = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
    single = count[gid] <= 1
    mean = jnp.where(single, 0.0, mean_g[gid])
    std = jnp.where(single, 1.0, std_g[gid])
    adv = jnp.where(real, (r - mean) / (std + eps), 0.0)
    return GroupStats(adv, mean, std, real & (~single) & (std_g[gid] == 0))


def overlong_penalty(response_len: jax.Array, max_response_length: int, buffer_len: int,
                     factor: float = 1.0) -> jax.Array:
    """DAPO soft overlong penalty ``min(-(L - expected) / buffer, 0) * factor``, ``expected = max - buffer``.
    ``response_len [B]`` counts every response token (assistant and tool)."""
    expected = max_response_length - buffer_len
    return jnp.minimum(-(response_len.astype(jnp.float32) - expected) / buffer_len, 0.0) * factor


def gated_beta(adv: jax.Array, beta_min: float, beta_max: float, gamma: float) -> jax.Array:
    return beta_min + (beta_max - beta_min) * jax.nn.sigmoid(-gamma * adv)


def token_advantages(
    mode: str,
    adv: jax.Array,  # [B] GRPO advantage
    mask: jax.Array,  # [B, T] response mask
    student_logp: Optional[jax.Array] = None,  # [B, T] s (old policy), constant
    teacher_logp: Optional[jax.Array] = None,  # [B, T] q, constant
    weights: Optional[jax.Array] = None,  # [B, T] SOD step weights (sod) or IW-OPD weights (iw_opd)
    *,
    grpo_term: bool = True,
    opd_coef: float = 1.0,
    beta_min: float = 0.0,
    beta_max: float = 0.1,
    gamma: float = 1.0,
) -> jax.Array:
    """Per-token advantage ``[B, T]`` of ``mode`` (see module docstring); exactly 0 where ``mask == 0``."""
    if mode not in MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; known: {', '.join(MODES)}")
    m = mask.astype(jnp.float32)
    outcome = adv[:, None].astype(jnp.float32) * m
    if mode == "grpo" or (mode == "gated_opd" and beta_max <= beta_min):
        return outcome
    # where() rather than a product: q - s on tool tokens/padding may be inf or NaN.
    gap = jnp.where(m > 0, teacher_logp - student_logp, 0.0)
    if mode == "gated_opd":
        return outcome + gated_beta(adv, beta_min, beta_max, gamma)[:, None] * gap
    if mode in WEIGHTED_MODES:
        gap = weights * gap
    base = outcome if grpo_term else jnp.zeros_like(outcome)
    return base + opd_coef * gap
