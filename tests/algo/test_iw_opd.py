"""IW-OPD weights against a per-token Python loop written from TRL's definition
(trl/experimental/iw_opd/iw_opd_trainer.py, ``_compute_iw_opd_loss``), and the iw_opd advantage mode."""

import numpy as np
import pytest

from sod_jax.algo.advantages import token_advantages
from sod_jax.algo.iw_opd import iw_opd_stats, iw_opd_weights


def loop_weights(s, q, m, gamma, epsilon):
    """Walk each row: the weight of a response token is 1 + gamma * (1 - (sum of |q - s| over the
    response tokens before it) / max(sum over all its response tokens, epsilon)); other tokens get 0."""
    B, T = m.shape
    out = np.zeros((B, T))
    for b in range(B):
        total = 0.0
        for t in range(T):
            if m[b, t]:
                total += abs(q[b, t] - s[b, t])
        total = max(total, epsilon)
        seen = 0.0
        for t in range(T):
            if m[b, t]:
                out[b, t] = 1.0 + gamma * (1.0 - seen / total)
                seen += abs(q[b, t] - s[b, t])
    return out


def random_batch(seed, B=10, T=48):
    rng = np.random.RandomState(seed)
    s = -rng.exponential(1.0, (B, T))
    q = -rng.exponential(1.0, (B, T))
    m = (rng.rand(B, T) < 0.6).astype(np.int32)
    m[0] = 0  # a row without steps
    m[1] = 0
    m[1, 7] = 1  # one token
    m[2, :] = 1
    q[2] = s[2]  # no discrepancy at all: the total is epsilon
    m[3] = 0
    m[3, 20:30] = 1  # one step in the middle, tool tokens around it
    s[~m.astype(bool)] = np.nan  # tool tokens / padding hold anything
    return s, q, m


@pytest.mark.parametrize("gamma,epsilon", [(0.5, 1e-8), (0.0, 1e-8), (2.0, 1e-3), (0.5, 10.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_equal_the_loop(gamma, epsilon, seed):
    s, q, m = random_batch(seed)
    got = np.asarray(iw_opd_weights(s, q, m, gamma, epsilon))
    np.testing.assert_allclose(got, loop_weights(s, q, m, gamma, epsilon), rtol=1e-5, atol=1e-6)
    assert np.all(got[0] == 0) and np.isfinite(got).all()
    assert np.all(got[2] == np.float32(1.0 + gamma))  # q == s: every token keeps the full weight
    on = m.astype(bool)
    assert np.all(got[on] >= 1.0 - 1e-6) and np.all(got[on] <= 1.0 + gamma + 1e-6)


def test_weights_equal_trls_tensor_formula():
    """The same weights from TRL's tensor expression, restated in torch on a completion without tool tokens."""
    import torch

    s, q, m = random_batch(3)
    s = np.nan_to_num(s, nan=-1.0)
    m[:] = 0
    m[:, :30] = 1  # completions of different lengths, right-padded, as TRL sees them
    m[4, 12:] = 0
    valid = torch.tensor(m.astype(bool))
    a = torch.where(valid, torch.tensor(q) - torch.tensor(s), 0.0).abs()
    w = 1.0 + 0.5 * (1.0 - (a.cumsum(1) - a) / a.sum(1, keepdim=True).clamp_min(1e-8))
    got = np.asarray(iw_opd_weights(s, q, m))
    np.testing.assert_allclose(got[m.astype(bool)], w.numpy()[m.astype(bool)], rtol=1e-5)


def test_iw_opd_advantage_mode_and_stats():
    s, q, m = random_batch(4)
    A = np.linspace(-1, 1, m.shape[0])
    w = np.asarray(iw_opd_weights(s, q, m, 0.5, 1e-8))
    gap = np.where(m > 0, q - np.nan_to_num(s), 0.0)
    got = np.asarray(token_advantages("iw_opd", A, m, s, q, w, opd_coef=0.7))
    np.testing.assert_allclose(got, A[:, None] * m + 0.7 * w * gap, rtol=1e-5, atol=1e-6)
    pure = np.asarray(token_advantages("iw_opd", A, m, s, q, w, grpo_term=False))
    np.testing.assert_allclose(pure, w * gap, rtol=1e-5, atol=1e-6)
    st = iw_opd_stats(w, m)
    on = m.astype(bool)
    np.testing.assert_allclose(st["iw_opd/mean_weight"], w[on].mean(), rtol=1e-5)
    assert float(st["iw_opd/min_weight"]) == pytest.approx(w[on].min())
    assert float(st["iw_opd/max_weight"]) == pytest.approx(w[on].max())


def test_gated_opd_without_range_drops_the_distillation_term():
    s, q, m = random_batch(5)
    A = np.linspace(-2, 2, m.shape[0])
    for bmin, bmax in ((0.0, 0.0), (0.3, 0.1)):
        got = np.asarray(token_advantages("gated_opd", A, m, s, q, beta_min=bmin, beta_max=bmax))
        np.testing.assert_allclose(got, A[:, None] * m)
    on = np.asarray(token_advantages("gated_opd", A, m, s, q))  # defaults: beta in [0, 0.1]
    beta = 0.1 / (1 + np.exp(A))
    np.testing.assert_allclose(on, A[:, None] * m + beta[:, None] * np.where(m > 0, q - np.nan_to_num(s), 0.0),
                               rtol=1e-5, atol=1e-6)
