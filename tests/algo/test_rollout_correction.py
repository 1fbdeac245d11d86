"""Rollout importance weights, the corrected PPO loss and the mismatch statistics against plain
re-computations (numpy, per-token loops)."""

import numpy as np
import pytest

from sod_jax.algo.losses import ppo_loss
from sod_jax.algo.rollout_correction import mismatch_stats, rollout_is_weights


def batch(seed, B=8, T=32):
    rng = np.random.RandomState(seed)
    old = -rng.exponential(1.0, (B, T))
    sampler = old + rng.normal(0.0, 0.4, (B, T))  # a sampler that disagrees a little
    m = (rng.rand(B, T) < 0.7).astype(np.int32)
    m[0] = 0  # a row without response tokens
    sampler[~m.astype(bool)] = np.nan  # the sampler reports nothing on tool tokens / padding
    return old, sampler, m


def loop_weights(old, sampler, m, level, cap):
    B, T = m.shape
    w = np.ones((B, T))
    for b in range(B):
        if level == "sequence":
            total = sum(old[b, t] - sampler[b, t] for t in range(T) if m[b, t])
            rho = min(np.exp(total), cap)
        for t in range(T):
            if m[b, t]:
                w[b, t] = rho if level == "sequence" else min(np.exp(old[b, t] - sampler[b, t]), cap)
    return w


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [2.0, 1.1, 100.0])
def test_weights_and_metrics_equal_the_loop(level, cap):
    old, sampler, m = batch(0)
    if level == "sequence":
        sampler = np.where(m > 0, old + np.random.RandomState(1).normal(0, 0.05, old.shape), np.nan)
    w, met = rollout_is_weights(old, sampler, m, level, cap)
    ref = loop_weights(old, sampler, m, level, cap)
    np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-5)
    on = m.astype(bool)
    if level == "token":
        raw = np.exp(old - sampler)[on]
        np.testing.assert_allclose(met["rollout_is/mean"], ref[on].mean(), rtol=1e-5)
        np.testing.assert_allclose(met["rollout_is/clipped_frac"], np.mean(raw > cap), rtol=1e-6)
    else:
        rows = on.any(1)
        per_row = np.array([np.exp(np.sum((old[b] - sampler[b])[on[b]])) for b in range(len(m))])[rows]
        np.testing.assert_allclose(met["rollout_is/mean"], np.minimum(per_row, cap).mean(), rtol=1e-5)
        np.testing.assert_allclose(met["rollout_is/clipped_frac"], np.mean(per_row > cap), rtol=1e-6)


def test_none_is_ones_and_bad_level_is_named():
    old, sampler, m = batch(2)
    w, met = rollout_is_weights(old, sampler, m, "none")
    assert np.all(np.asarray(w) == 1.0) and met == {}
    with pytest.raises(ValueError, match="unknown rollout_is level 'tok'"):
        rollout_is_weights(old, sampler, m, "tok")


def loop_ppo(logp, old, adv, m, rho, cl=0.2, ch=0.28, dual=3.0):
    """Token mean of rho * PPO loss (clip-higher, dual-clip), one token at a time."""
    total, n = 0.0, 0
    B, T = m.shape
    for b in range(B):
        for t in range(T):
            if not m[b, t]:
                continue
            r = np.exp(np.clip(logp[b, t] - old[b, t], -20, 20))
            a = adv[b, t]
            loss = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if a < 0:
                loss = min(loss, -a * dual)
            total += rho[b, t] * loss
            n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("level", ["none", "token", "sequence"])
def test_corrected_loss_and_gradient_equal_the_loop(level):
    import jax

    old, sampler, m = batch(3)
    rng = np.random.RandomState(4)
    logp = old + rng.normal(0, 0.3, old.shape)
    adv = rng.normal(0, 1.0, old.shape)
    w, _ = rollout_is_weights(old, sampler, m, level, 2.0)
    rho = loop_weights(old, sampler, m, level, 2.0) if level != "none" else np.ones_like(old)
    loss, _ = ppo_loss(logp, old, adv, m, is_weights=w)
    np.testing.assert_allclose(loss, loop_ppo(logp, old, adv, m, rho), rtol=1e-5)
    # The weights are constants: d loss / d logp is rho times the uncorrected token gradient.
    g = jax.grad(lambda lp: ppo_loss(lp, old, adv, m, is_weights=w)[0])(logp)
    g0 = jax.grad(lambda lp: ppo_loss(lp, old, adv, m)[0])(logp)
    np.testing.assert_allclose(np.asarray(g), rho * np.asarray(g0), rtol=1e-5, atol=1e-9)


def test_mismatch_stats():
    old, sampler, m = batch(5)
    st = mismatch_stats(old, sampler, m)
    d = np.abs(sampler - old)[m.astype(bool)]
    np.testing.assert_allclose(st["rollout_mismatch/mean"], d.mean(), rtol=1e-5)
    np.testing.assert_allclose(st["rollout_mismatch/max"], d.max(), rtol=1e-6)
    empty = mismatch_stats(old, sampler, np.zeros_like(m))
    assert float(empty["rollout_mismatch/mean"]) == 0.0 and float(empty["rollout_mismatch/max"]) == 0.0
