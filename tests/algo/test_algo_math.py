"""SOD weights, GRPO advantages and the PPO loss against plain per-token Python/numpy written from the
definitions in DESIGN §1.1."""

import numpy as np
import pytest

from sod_jax.algo.advantages import grpo_advantages, overlong_penalty, token_advantages
from sod_jax.algo.losses import aggregate, kl_estimates, ppo_loss
from sod_jax.algo.sod import step_stats, step_weights
from sod_jax.bench.sod_weights import loop_step_weights

# The per-token reference is the benchmark's baseline loop (checked against hand-computed weights
# in tests/test_bench.py): runs of m == 1, d_k = mean |s - q|, running product, clip at the output.
reference_weights = loop_step_weights


def random_mask(rng, B, T, p_switch):
    m = np.zeros((B, T), np.int32)
    for b in range(B):
        state = rng.rand() < 0.5
        for t in range(T):
            if rng.rand() < p_switch:
                state = not state
            m[b, t] = state
    return m


@pytest.mark.parametrize("eps,delta", [(1e-6, 0.2), (1e-6, 1e-9), (1e-3, 50.0), (0.5, 0.0)])
def test_step_weights_equal_per_token_reference(eps, delta):
    rng = np.random.RandomState(0)
    B, T = 12, 40
    s = -rng.exponential(1.0, (B, T))
    q = -rng.exponential(1.0, (B, T))
    m = random_mask(rng, B, T, 0.2)
    m[0] = 0  # empty row
    m[1] = 0
    m[1, 5:15] = 1  # one step
    m[2] = 0
    m[2, 30:] = 1  # one step touching the end
    m[3] = np.tile([1, 0], T // 2)  # many one-token steps
    m[4] = 0
    m[4, :4] = 1
    m[4, 10:20] = 1
    m[4, 25:] = 1  # d_1 = 0 below
    q[4, :4] = s[4, :4]
    got = np.asarray(step_weights(s, q, m, eps, delta))
    np.testing.assert_allclose(got, reference_weights(s, q, m, eps, delta), rtol=1e-5, atol=1e-6)
    assert np.all(got[0] == 0)
    # d_1 = 0: later steps have d_k > 0, so w_k = eps / (d_k + eps) is tiny but the first step keeps 1.
    assert got[4, 0] == 1.0
    if eps < 1e-5:
        assert got[4, 12] < 1e-3


def test_telescoped_form_and_outputs():
    rng = np.random.RandomState(1)
    B, T = 8, 64
    s, q = -rng.exponential(1.0, (B, T)), -rng.exponential(1.0, (B, T))
    m = random_mask(rng, B, T, 0.15)
    st = step_stats(s, q, m, 1e-6, 0.2)
    d, w, lens = map(np.asarray, (st.divergence, st.step_weight, st.step_len))
    for b in range(B):
        K = int(st.num_steps[b])
        assert np.all(lens[b, 1:K + 1] > 0) and np.all(lens[b, K + 1:] == 0)
        for k in range(2, K + 1):
            np.testing.assert_allclose(w[b, k], min((d[b, 1] + 1e-6) / (d[b, k] + 1e-6), 1.2), rtol=1e-5)
        if K:
            assert w[b, 1] == 1.0


def test_step_weights_ignore_nan_outside_steps():
    s = np.array([[np.nan, -1.0, -2.0, np.inf, -1.0]])
    q = np.array([[0.0, -1.5, -2.0, -3.0, -3.0]])
    m = np.array([[0, 1, 1, 0, 1]])
    w = np.asarray(step_weights(s, q, m, 1e-6, 0.2))
    assert np.isfinite(w).all() and w[0, 0] == 0 and w[0, 3] == 0
    np.testing.assert_allclose(w[0, 4], (0.25 + 1e-6) / (2.0 + 1e-6), rtol=1e-6)


def numpy_grpo(r, g, eps):
    out = np.zeros_like(r)
    for gid in np.unique(g):
        idx = np.where(g == gid)[0]
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = r[idx].mean(), r[idx].std(ddof=1)
        out[idx] = (r[idx] - mean) / (std + eps)
    return out


def test_grpo_advantages_match_numpy():
    rng = np.random.RandomState(2)
    g = np.repeat(np.arange(6), [4, 4, 1, 3, 4, 2])
    r = rng.randn(len(g)).astype(np.float32)
    r[g == 1] = 0.5  # zero-variance group
    st = grpo_advantages(r, g, num_groups=6, eps=1e-6)
    np.testing.assert_allclose(st.advantage, numpy_grpo(r, g, 1e-6), rtol=1e-5, atol=1e-6)
    assert np.asarray(st.zero_variance).tolist() == (g == 1).tolist()
    np.testing.assert_allclose(st.advantage[g == 2], r[g == 2] / (1 + 1e-6), rtol=1e-6)


def test_overlong_penalty():
    L = np.array([100, 19456, 19457, 20000, 20480])
    got = np.asarray(overlong_penalty(L, 20480, 1024))
    np.testing.assert_allclose(got, [min(-(x - 19456) / 1024, 0) for x in L], rtol=1e-6)


def numpy_ppo(logp, old, adv, m, cl, ch, dual, clamp, agg):
    r = np.exp(np.clip(logp - old, -clamp, clamp))
    L = np.maximum(-adv * r, -adv * np.clip(r, 1 - cl, 1 + ch))
    L = np.where(adv < 0, np.minimum(L, -adv * dual), L)
    if agg == "token-mean":
        return (L * m).sum() / m.sum()
    rows = [(L[b] * m[b]).sum() / m[b].sum() for b in range(len(m)) if m[b].sum() > 0]
    return np.mean(rows)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_loss_matches_numpy(agg):
    rng = np.random.RandomState(3)
    B, T = 6, 30
    old = -rng.exponential(1.0, (B, T))
    logp = old + rng.randn(B, T) * 0.6  # ratios far outside the clip range, both sides
    adv = rng.randn(B, T) * 2
    m = (rng.rand(B, T) < 0.7).astype(np.float32)
    m[5] = 0
    loss, met = ppo_loss(logp, old, adv, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0,
                         loss_agg=agg)
    np.testing.assert_allclose(loss, numpy_ppo(logp, old, adv, m, 0.2, 0.28, 3.0, 20.0, agg), rtol=1e-5)
    assert 0 < float(met["dual_clip_frac"]) < 1 and 0 < float(met["clip_frac"]) < 1


def test_log_ratio_clamp():
    loss, met = ppo_loss(np.array([[100.0]]), np.array([[0.0]]), np.array([[-1.0]]), np.array([[1.0]]),
                         dual_clip=0.0)
    np.testing.assert_allclose(loss, np.exp(20.0), rtol=1e-5)


def test_token_advantages_each_mode():
    rng = np.random.RandomState(4)
    B, T = 4, 10
    A = rng.randn(B).astype(np.float32)
    m = (rng.rand(B, T) < 0.6).astype(np.float32)
    s, q = -rng.exponential(1.0, (B, T)), -rng.exponential(1.0, (B, T))
    w = rng.rand(B, T)
    s_pad = np.where(m > 0, s, np.nan)  # garbage outside the mask must not leak
    kw = dict(mask=m, student_logp=s_pad, teacher_logp=q, weights=w)
    gap = (q - s) * m
    np.testing.assert_allclose(token_advantages("grpo", A, **kw), A[:, None] * m, atol=1e-6)
    np.testing.assert_allclose(token_advantages("opd", A, **kw), A[:, None] * m + gap, atol=1e-5)
    np.testing.assert_allclose(token_advantages("opd", A, grpo_term=False, opd_coef=0.5, **kw), 0.5 * gap, atol=1e-5)
    np.testing.assert_allclose(token_advantages("sod", A, **kw), A[:, None] * m + w * gap, atol=1e-5)
    beta = 0.1 + 0.8 / (1 + np.exp(2.0 * A))
    np.testing.assert_allclose(token_advantages("gated_opd", A, beta_min=0.1, beta_max=0.9, gamma=2.0, **kw),
                               A[:, None] * m + beta[:, None] * gap, atol=1e-5)
    np.testing.assert_allclose(token_advantages("opsd_gt", A, **kw), token_advantages("opd", A, **kw))
    with pytest.raises(ValueError, match="unknown advantage mode 'ppo'"):
        token_advantages("ppo", A, m)


def test_kl_estimates():
    s = np.log(np.array([[0.5, 0.2, 0.9]]))
    q = np.log(np.array([[0.25, 0.4, 0.9]]))
    m = np.array([[1, 1, 0]])
    k = kl_estimates(s, q, m)
    r = np.exp(q - s)[0, :2]
    np.testing.assert_allclose(k["kl_k1"], np.mean((s - q)[0, :2]), rtol=1e-6)
    np.testing.assert_allclose(k["kl_k3"], np.mean(r - 1 - np.log(r)), rtol=1e-6)
    assert float(aggregate(np.ones((1, 3)), m)) == 1.0
