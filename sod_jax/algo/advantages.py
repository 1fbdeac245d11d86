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

Which modes read ``q`` and which weight the distillation term is the table of
:mod:`sod_jax.algo.modes`. :func:`overlong_penalty` is the one definition of DAPO's overlong reward
shaping (the RL trainer and the evaluation add it to the score).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sod_jax.algo import modes


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


def overlong_penalty(response_len: Union[int, np.ndarray, jax.Array], max_response_length: int, buffer_len: int,
                     factor: float = 1.0) -> Union[float, np.ndarray, jax.Array]:
    """DAPO soft overlong penalty ``min(-(L - expected) / buffer, 0) * factor``, ``expected = max - buffer``:
    0 up to ``expected`` response tokens, then linear down to ``-factor`` at ``max_response_length``.

    ``response_len`` counts every response token (assistant and tool): a Python int (gives a Python
    float) or an array ``[B]`` (numpy gives numpy, jax gives jax; float32). ``buffer_len <= 0`` is
    no penalty (0)."""
    if isinstance(response_len, numbers.Real):
        if buffer_len <= 0:
            return 0.0
        expected = max_response_length - buffer_len
        return min(-(response_len - expected) / buffer_len, 0.0) * factor
    xp = np if isinstance(response_len, np.ndarray) else jnp
    length = xp.asarray(response_len).astype(xp.float32)
    if buffer_len <= 0:
        return xp.zeros_like(length)
    expected = max_response_length - buffer_len
    return (xp.minimum(-(length - expected) / buffer_len, 0.0) * factor).astype(xp.float32)


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
    if mode not in modes.MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; known: {', '.join(modes.NAMES)}")
    info = modes.MODES[mode]
    m = mask.astype(jnp.float32)
    outcome = adv[:, None].astype(jnp.float32) * m
    if not info.teacher_logp or (mode == "gated_opd" and beta_max <= beta_min):
        return outcome
    # where() rather than a product: q - s on tool tokens/padding may be inf or NaN.
    gap = jnp.where(m > 0, teacher_logp - student_logp, 0.0)
    if mode == "gated_opd":
        return outcome + gated_beta(adv, beta_min, beta_max, gamma)[:, None] * gap
    if info.weights is not None:
        gap = weights * gap
    base = outcome if grpo_term else jnp.zeros_like(outcome)
    return base + opd_coef * gap
