"""Sampling filters against the truncated, renormalised distribution (chi-square, fixed seed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sod_jax.rollout.sampling import SamplingParams, filter_logits, request_key, sample, token_keys

LOGITS = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.08, 0.06, 0.04, 0.03]))
CHI2_CRIT_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def expected(temperature, top_k, top_p):
    """Written from the definitions: temperature, then keep the k largest, then the smallest prefix
    (by probability) whose mass above each kept token is < p; renormalise."""
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    k = len(p) if top_k <= 0 else top_k
    kept = order[:k]
    q = p[kept] / p[kept].sum()
    above = 0.0
    for idx, prob in zip(kept, q):
        if above < top_p:
            keep[idx] = True
        above += prob
    out = np.where(keep, p, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.0, 3, 1.0),
                                                      (1.0, -1, 0.6), (0.8, 5, 0.7), (1.5, 6, 0.9)])
def test_empirical_frequencies_match_truncated_distribution(temperature, top_k, top_p):
    n = 40_000
    S = n
    keys = jax.vmap(lambda i: request_key(1234, i))(jnp.arange(S))
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (S, len(LOGITS)))
    tok, lp = jax.jit(sample, static_argnums=6)(
        logits, token_keys(keys, jnp.zeros(S, jnp.int32)), jnp.full(S, temperature), jnp.full(S, top_k, jnp.int32),
        jnp.full(S, top_p), jnp.zeros(S, bool), "filter")
    counts = np.bincount(np.asarray(tok), minlength=len(LOGITS))
    exp = expected(temperature, top_k, top_p)
    assert np.all(counts[exp == 0] == 0)
    support = exp > 0
    chi2 = float(np.sum((counts[support] - n * exp[support]) ** 2 / (n * exp[support])))
    df = int(support.sum()) - 1
    if df:
        assert chi2 < CHI2_CRIT_0_001[df], (chi2, counts, n * exp)
    # the log-prob is under the raw policy, whatever the filters
    np.testing.assert_allclose(np.asarray(lp), LOGITS[np.asarray(tok)] - np.log(np.exp(LOGITS).sum()), atol=1e-5)


def test_greedy_is_argmax_and_filter_keeps_ties():
    S = 4
    logits = jnp.asarray(np.tile(LOGITS, (S, 1)), jnp.float32)
    tok, _ = sample(logits, token_keys(jnp.stack([request_key(i) for i in range(S)]), jnp.zeros(S, jnp.int32)),
                    jnp.ones(S), jnp.full(S, -1), jnp.ones(S), jnp.ones(S, bool), "sample")
    assert np.asarray(tok).tolist() == [0] * S  # per-slot greedy flags win inside a sampling call
    tied = filter_logits(jnp.asarray([[1.0, 1.0, 0.0]]), jnp.asarray([1]), jnp.asarray([1.0]))
    assert np.isfinite(np.asarray(tied)[0, :2]).all()


def test_sampling_options_are_validated():
    with pytest.raises(ValueError, match=r"unknown sampling option\(s\) \['top_q'\]"):
        SamplingParams.from_options(top_q=0.9)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(temperature=0.0)
    assert SamplingParams(top_k=5).filters and not SamplingParams(greedy=True, top_k=5).filters


def test_bisection_filter_equals_sorted_definition():
    """filter_logits (bisection) keeps exactly the tokens a sort-based implementation keeps."""
    rng = np.random.RandomState(0)
    S, V = 64, 300
    logits = rng.randn(S, V).astype(np.float32) * 3
    top_k = rng.choice([-1, 1, 5, 50, 299], S)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.1, 0.999], S)
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p))) > -1e29
    for i in range(S):
        order = np.argsort(-logits[i])
        k = V if top_k[i] <= 0 else top_k[i]
        kept = order[:k]
        p = np.exp(logits[i, kept].astype(np.float64) - logits[i, kept].max())
        p /= p.sum()
        above = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        expect = np.zeros(V, bool)
        expect[kept[(above < top_p[i]) | (top_p[i] >= 1.0)]] = True  # p = 1 keeps everything
        assert (got[i] == expect).all(), i
