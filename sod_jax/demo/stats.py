"""The statistics of the demo comparison (``python -m sod_jax.demo compare``): pure numpy + scipy.

Notation: ``n`` paired seeds; for seed ``i`` the difference ``x_i = acc_a(i) - acc_b(i)`` of the
final held-out accuracies of two methods run with that seed; ``level`` the coverage (0.95).

Paired t interval (:func:`paired_t_interval`)::

    mean = (1/n) sum_i x_i
    sd   = sqrt( sum_i (x_i - mean)^2 / (n - 1) )            (ddof = 1)
    t    = t_{n-1}^{-1}((1 + level) / 2)                      (Student t quantile, scipy.stats.t.ppf)
    [lo, hi] = mean -/+ t * sd / sqrt(n)

Hierarchical paired bootstrap (:func:`bootstrap_interval`). Method ``a`` and ``b`` give, per seed
``i``, a per-prompt correctness vector ``a_i[p]`` / ``b_i[p]`` (each prompt's mean over its
samples), ``p = 0..P_i - 1``, the same prompts in the same order for both methods. Let
``D_i[p] = a_i[p] - b_i[p]``. The point estimate is

    mean = (1/n) sum_i (1/P_i) sum_p D_i[p]            (= the mean of the per-seed accuracy differences)

and one replicate ``r`` draws seeds ``s_{r,1..n}`` uniformly with replacement from ``0..n-1`` and,
within each drawn seed ``j = s_{r,m}``, prompts ``q_{r,m,1..P_j}`` uniformly with replacement from
``0..P_j - 1`` (the same indices for ``a`` and ``b``: the pairing by seed and by prompt), giving

    T_r = (1/n) sum_m (1/P_{s_{r,m}}) sum_l D_{s_{r,m}}[q_{r,m,l}].

The interval is the percentile interval ``[Q_{(1-level)/2}(T), Q_{(1+level)/2}(T)]`` (numpy's
default linear interpolation). Draw order, so a direct loop can replay it: per chunk of ``c``
replicates (:func:`bootstrap_chunk`), first ``rng.integers(0, n, (c, n))`` (the seeds),
then ``rng.integers(0, P_chosen, (c, n, P_max))`` (the prompts; positions ``>= P_chosen`` are
drawn and ignored), with ``rng = np.random.default_rng(seed)``.

Sign count (:func:`sign_count`): ``(#{x_i > 0}, #{x_i < 0}, #{x_i = 0})``.

Seeds needed (:func:`seeds_needed`): the smallest ``n >= at_least`` with

    2 * t_{n-1}^{-1}((1 + level) / 2) * sd / sqrt(n) < min_effect

where ``sd`` is the pilot's paired standard deviation of ``x``; ``at_most`` when no ``n`` up to it
qualifies. With that many seeds a 95% interval (if the spread is as in the pilot) is narrower than
the minimum effect of interest, so it either excludes 0 or lies inside ``(-min_effect, min_effect)``:
every outcome decides.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _st

# Replicates drawn per vectorised chunk of the bootstrap: at most BOOTSTRAP_CHUNK, and at most
# BOOTSTRAP_MAX_DRAWS prompt draws (chunk x seeds x prompts) per chunk, which bounds memory.
BOOTSTRAP_CHUNK = 512
BOOTSTRAP_MAX_DRAWS = 4_000_000


def bootstrap_chunk(n_seeds: int, max_prompts: int) -> int:
    """Replicates per vectorised chunk of :func:`bootstrap_interval` for ``n_seeds`` x ``max_prompts``."""
    return max(1, min(BOOTSTRAP_CHUNK, BOOTSTRAP_MAX_DRAWS // max(1, n_seeds * max_prompts)))


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student t critical value ``t_df^{-1}((1 + level) / 2)``."""
    return float(_st.t.ppf((1.0 + level) / 2.0, df))


def paired_t_interval(diffs: Sequence[float], level: float = 0.95) -> dict:
    """Paired t interval of the mean of ``diffs`` (shape ``[n]``, one difference per seed).

    Returns ``{"mean", "lo", "hi", "sd", "n", "t"}``: ``sd`` with ddof 1, ``t`` the quantile
    ``t_{n-1}((1 + level) / 2)``. With ``n < 2`` the spread is unknown: ``sd``, ``t``, ``lo`` and
    ``hi`` are NaN (``mean`` is NaN for ``n = 0``)."""
    x = np.asarray(diffs, dtype=np.float64).reshape(-1)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "sd": math.nan, "n": n, "t": math.nan}
    sd = float(x.std(ddof=1))
    t = t_quantile(n - 1, level)
    half = t * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n, "t": t}


def _differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} seeds and b has {len(b)}: they must be paired by seed")
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"seed {i}: a has {x.size} prompts and b has {y.size}: they must be paired by prompt")
        if x.size == 0:
            raise ValueError(f"seed {i} has no prompts")
        out.append(x - y)
    return out


def bootstrap_interval(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], reps: int = 10000,
                       level: float = 0.95, seed: int = 0) -> dict:
    """Hierarchical paired bootstrap of the mean difference ``a - b`` (module docstring).

    ``a``, ``b``: lists over seeds (length ``n``, paired by seed) of per-prompt correctness arrays
    (shape ``[P_i]``: each prompt's mean over its samples; the same prompts in the same order for
    ``a`` and ``b``). Seeds are resampled with replacement, then prompts within each drawn seed
    with replacement (the same indices for ``a`` and ``b``). Returns ``{"mean", "lo", "hi"}``:
    ``mean`` the plain mean over seeds of the per-seed mean differences, ``[lo, hi]`` the
    percentile interval of the ``reps`` replicates. Vectorised over replicates, seeds and prompts
    (chunks of :func:`bootstrap_chunk` replicates)."""
    d = _differences(a, b)
    n = len(d)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    sizes = np.array([x.size for x in d])  # [n]
    p_max = int(sizes.max())
    padded = np.zeros((n, p_max))
    for i, x in enumerate(d):
        padded[i, :x.size] = x
    mean = float(np.mean([x.mean() for x in d]))
    rng = np.random.default_rng(seed)
    reps = int(reps)
    out = np.empty(reps)
    cols = np.arange(p_max)
    chunk = bootstrap_chunk(n, p_max)
    for start in range(0, reps, chunk):
        c = min(chunk, reps - start)
        chosen = rng.integers(0, n, size=(c, n))  # [c, n] seeds
        p_chosen = sizes[chosen]  # [c, n]
        prompts = rng.integers(0, p_chosen[..., None], size=(c, n, p_max))  # [c, n, P_max]
        vals = padded[chosen[..., None], prompts]  # [c, n, P_max]
        vals = np.where(cols < p_chosen[..., None], vals, 0.0)
        per_seed = vals.sum(axis=2) / p_chosen  # [c, n]
        out[start:start + c] = per_seed.mean(axis=1)
    lo, hi = np.quantile(out, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"mean": mean, "lo": float(lo), "hi": float(hi)}


def sign_count(diffs: Sequence[float]) -> tuple[int, int, int]:
    """``(positive, negative, ties)`` among ``diffs`` (shape ``[n]``)."""
    x = np.asarray(diffs, dtype=np.float64).reshape(-1)
    return int(np.sum(x > 0)), int(np.sum(x < 0)), int(np.sum(x == 0))


def seeds_needed(pilot_diffs_sd: float, min_effect: float, level: float = 0.95, at_least: int = 6,
                 at_most: int = 64) -> int:
    """Smallest ``n >= at_least`` whose paired-t interval full width ``2 t_{n-1} sd / sqrt(n)`` is
    below ``min_effect`` (``sd`` = ``pilot_diffs_sd``, the pilot's paired standard deviation);
    ``at_most`` when no ``n <= at_most`` qualifies (or ``sd`` is not finite)."""
    if min_effect <= 0:
        raise ValueError(f"min_effect must be > 0, got {min_effect}")
    sd = float(pilot_diffs_sd)
    if not math.isfinite(sd):
        return int(at_most)
    for n in range(max(int(at_least), 2), int(at_most) + 1):
        if 2.0 * t_quantile(n - 1, level) * sd / math.sqrt(n) < min_effect:
            return n
    return int(at_most)
