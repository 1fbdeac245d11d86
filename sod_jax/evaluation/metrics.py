"""At-k evaluation metrics (pure Python / numpy; no JAX).

* :func:`pass_at_k` — the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` in exact integer arithmetic.
* :func:`avg_at_k` — mean over prompts of the fraction correct among the first k samples (the paper's
  avg@32).
* :func:`maj_at_k` — majority vote over the extracted answers of the first k samples.
* :func:`bootstrap_metrics` / :func:`validation_metrics` — the reference's (verl's) bootstrap figures
  ``mean@n``, ``std@n``, ``best@k/mean``, ``worst@k/mean``, ``maj@k/mean`` (and ``/std``) under verl's
  key names, so our numbers compare with the paper's tables. The paper's "pass@32" is the bootstrap
  ``best@32/mean`` (an estimate of ``1 - (1 - c/n)^n`` from resampling WITH replacement), not
  :func:`pass_at_k`.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from fractions import Fraction
from typing import Hashable, Mapping, Optional, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is
    correct: ``1 - C(n-c, k) / C(n, k)``, computed exactly (integers, no overflow) then rounded once."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def _check_k(lists: Sequence[Sequence], k: int, what: str) -> None:
    if k < 1:
        raise ValueError(f"{what}: k must be >= 1, got {k}")
    if not lists:
        raise ValueError(f"{what}: no prompts")
    short = [i for i, x in enumerate(lists) if len(x) < k]
    if short:
        raise ValueError(f"{what}: prompt {short[0]} has {len(lists[short[0]])} samples, fewer than k={k}")


def avg_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """``correct[p]`` = per-sample correctness of prompt p (samples in order); mean over prompts of the
    fraction correct among the first k samples."""
    _check_k(correct, k, "avg_at_k")
    return float(np.mean([sum(bool(x) for x in c[:k]) / k for c in correct]))


def majority_answer(preds: Sequence[str]) -> Optional[int]:
    """Index of the first occurrence of the most frequent non-empty pred (ties: the answer whose first
    occurrence is earliest); None when every pred is empty."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, p in enumerate(preds):
        if p is None or p == "":
            continue
        counts[p] = counts.get(p, 0) + 1
        first.setdefault(p, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[p] for p, c in counts.items() if c == best)


def maj_at_k(preds: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]], k: int) -> float:
    """Majority vote per prompt among the first k samples: the most frequent non-empty ``pred`` (ties to
    the answer seen first) counts as solved when its first occurrence is correct; a prompt without any
    non-empty pred is unsolved. Mean over prompts."""
    _check_k(preds, k, "maj_at_k")
    if len(preds) != len(correct):
        raise ValueError(f"maj_at_k: {len(preds)} prompts of preds but {len(correct)} of correct")
    solved = []
    for p, c in zip(preds, correct):
        if len(c) < k:
            raise ValueError(f"maj_at_k: a prompt has {len(c)} correctness values, fewer than k={k}")
        i = majority_answer(list(p[:k]))
        solved.append(i is not None and bool(c[i]))
    return float(np.mean(solved))


# ---------------------------------------------------------------------------------------------
# The reference's bootstrap figures (verl's process_validation_metrics)
# ---------------------------------------------------------------------------------------------


def bootstrap_ks(n: int) -> list[int]:
    """Subset sizes the reference resamples: 2, 4, 8, ... below n, then n."""
    ks, k = [], 2
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


@functools.lru_cache(maxsize=64)
def _resample(n: int, k: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``[n_bootstrap, k]`` indices: the draws of ``n_bootstrap`` successive ``np.random.choice(n, k)``
    calls after ``np.random.seed(seed)`` (legacy Mersenne Twister; one call of shape
    ``[n_bootstrap, k]`` draws the same stream), without touching the global RNG. The reference
    re-seeds before every figure, so every prompt with n samples sees the same draws: cached."""
    idx = np.random.RandomState(seed).choice(n, size=(n_bootstrap, k), replace=True)
    idx.setflags(write=False)
    return idx


def _majority_values(votes: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Per row of ``votes`` ``[R, k]`` (int codes in [0, m)): the value at the first occurrence of the
    most frequent vote, ties to the vote seen first in the row (verl's ``calc_maj_val``)."""
    r, _ = votes.shape
    m = int(votes.max()) + 1
    counts = np.bincount((np.arange(r)[:, None] * m + votes).ravel(), minlength=r * m).reshape(r, m)
    per_pos = np.take_along_axis(counts, votes, axis=1)  # [R, k]: how often each position's vote occurs
    pos = per_pos.argmax(-1)  # first position holding a most frequent vote = that vote's first occurrence
    return vals[np.arange(r), pos]


def prompt_bootstrap(values: Sequence[float], preds: Optional[Sequence[str]] = None, *, n_bootstrap: int = 1000,
                     seed: int = 42) -> dict[str, float]:
    """The reference's figures of ONE prompt's n samples: ``mean@n``; for n > 1 ``std@n`` (ddof 0) and,
    for each k of :func:`bootstrap_ks`, ``best@k``/``worst@k`` (max/min over each resample) and, with
    ``preds``, ``maj@k`` (majority vote), each as ``/mean`` and ``/std`` over the resamples. The RNG is
    re-seeded for every k and figure, as the reference does."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    out = {f"mean@{n}": float(np.mean(v))}
    if n <= 1:
        return out
    out[f"std@{n}"] = float(np.std(v))
    codes = None
    if preds is not None:
        if len(preds) != n:
            raise ValueError(f"prompt_bootstrap: {n} values but {len(preds)} preds")
        table: dict = {}
        codes = np.array([table.setdefault(p, len(table)) for p in preds])
    for k in bootstrap_ks(n):
        idx = _resample(n, k, n_bootstrap, seed)  # the same draws for best/worst and for maj (same seed)
        sub = v[idx]
        for name, red in (("best", sub.max(-1)), ("worst", sub.min(-1))):
            out[f"{name}@{k}/mean"], out[f"{name}@{k}/std"] = float(red.mean()), float(red.std())
        if codes is not None:
            maj = _majority_values(codes[idx], sub)
            out[f"maj@{k}/mean"], out[f"maj@{k}/std"] = float(maj.mean()), float(maj.std())
    return out


def bootstrap_metrics(data_sources: Sequence[str], prompt_ids: Sequence[Hashable],
                      values: Mapping[str, Sequence[float]], preds: Optional[Sequence[str]] = None, *,
                      n_bootstrap: int = 1000, seed: int = 42) -> dict[str, dict[str, dict[str, float]]]:
    """verl's ``process_validation_metrics``: samples grouped by data source and prompt, each numeric
    variable (e.g. ``{"acc": [...], "score": [...]}``, one entry per sample) reduced per prompt by
    :func:`prompt_bootstrap`, then averaged over the prompts of a source.

    Returns ``{data_source: {var: {metric: value}}}``; :func:`validation_metrics` gives verl's flat keys.
    """
    m = len(data_sources)
    if len(prompt_ids) != m or any(len(v) != m for v in values.values()) or (preds is not None and len(preds) != m):
        raise ValueError("bootstrap_metrics: data_sources, prompt_ids, every values list and preds need one "
                         "entry per sample")
    groups: dict[str, dict[Hashable, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (src, pid) in enumerate(zip(data_sources, prompt_ids)):
        groups[src][pid].append(i)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for src, prompts in groups.items():
        per_var: dict[str, dict[str, list[float]]] = {}
        for var, vals in values.items():
            acc: dict[str, list[float]] = defaultdict(list)
            for idx in prompts.values():
                fig = prompt_bootstrap([vals[i] for i in idx], None if preds is None else [preds[i] for i in idx],
                                       n_bootstrap=n_bootstrap, seed=seed)
                for name, x in fig.items():
                    acc[name].append(x)
            per_var[var] = {name: float(np.mean(xs)) for name, xs in acc.items()}
        out[src] = per_var
    return out


def validation_metrics(nested: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """verl's flat names: ``val-core/<source>/<var>/<metric>`` for the core variable (``acc`` when
    present, else ``reward``) and metrics starting with mean/maj/best at the largest n; the rest under
    ``val-aux/``."""
    flat = {}
    for src, var2 in nested.items():
        core_var = "acc" if "acc" in var2 else "reward"
        for var, metrics in var2.items():
            n_max = max(int(name.split("@")[-1].split("/")[0]) for name in metrics)
            for name, x in metrics.items():
                core = (var == core_var and name.startswith(("mean", "maj", "best")) and f"@{n_max}" in name)
                flat[f"{'val-core' if core else 'val-aux'}/{src}/{var}/{name}"] = x
    return flat
