"""The comparison's statistics (sod_jax.demo.stats) against direct computations on fixed inputs:
hand arithmetic with t quantiles from a printed table, brute-force loops, and a replica of the
bootstrap's documented draws evaluated one replicate at a time."""

import math

import numpy as np
import pytest

from sod_jax.demo import stats

# Two-sided 95% Student t critical values t_{df, 0.975}, from a printed table.
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 19: 2.0930, 29: 2.0452}
T95_DF4 = 2.1318  # t_{4, 0.95}: the 90% two-sided value


def test_paired_t_interval_by_hand():
    diffs = [0.02, 0.05, -0.01, 0.04, 0.03]
    n = 5
    mean = sum(diffs) / n  # 0.026
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))  # sqrt(0.00212 / 4)
    assert math.isclose(mean, 0.026) and math.isclose(sd, math.sqrt(0.00053))
    r = stats.paired_t_interval(diffs)
    assert r["n"] == 5 and math.isclose(r["mean"], mean, abs_tol=1e-12) and math.isclose(r["sd"], sd, rel_tol=1e-12)
    assert abs(r["t"] - T975[4]) < 1e-4
    half = T975[4] * sd / math.sqrt(n)
    assert abs(r["lo"] - (mean - half)) < 1e-5 and abs(r["hi"] - (mean + half)) < 1e-5
    # a 90% interval uses t_{4, 0.95}
    r90 = stats.paired_t_interval(diffs, level=0.90)
    assert abs(r90["t"] - T95_DF4) < 1e-4
    assert abs(r90["hi"] - (mean + T95_DF4 * sd / math.sqrt(n))) < 1e-5


def test_paired_t_interval_small_n():
    r = stats.paired_t_interval([0.1])
    assert r["mean"] == 0.1 and r["n"] == 1 and all(math.isnan(r[k]) for k in ("lo", "hi", "sd", "t"))
    assert math.isnan(stats.paired_t_interval([])["mean"])
    r = stats.paired_t_interval([0.0, 0.2])  # n = 2: df 1
    assert abs(r["t"] - T975[1]) < 1e-4 and abs(r["hi"] - (0.1 + T975[1] * math.sqrt(0.02) / math.sqrt(2))) < 1e-4


def test_sign_count_by_hand():
    assert stats.sign_count([0.1, -0.2, 0.0, 0.3, 0.0, -0.1, 0.05]) == (3, 2, 2)
    assert stats.sign_count([]) == (0, 0, 0)
    assert stats.sign_count(np.array([-1.0, -2.0])) == (0, 2, 0)


def _seeds_needed_brute(sd, min_effect, at_least=6, at_most=64):
    for n in range(at_least, at_most + 1):
        if 2 * T975[n - 1] * sd / math.sqrt(n) < min_effect:
            return n
    return at_most


def test_seeds_needed_against_a_table_brute_force():
    # sd 0.03, effect 0.04: n = 11 gives 2 * 2.2281 * 0.03 / sqrt(11) = 0.0403 (too wide), n = 12 gives 0.0381
    assert stats.seeds_needed(0.03, 0.04) == 12
    for sd, eff in [(0.03, 0.04), (0.02, 0.04), (0.01, 0.04), (0.035, 0.05), (0.025, 0.035)]:
        expect = _seeds_needed_brute(sd, eff, 6, 16)  # the table covers df up to 15
        assert expect < 16, (sd, eff)
        assert stats.seeds_needed(sd, eff, at_most=16) == expect, (sd, eff)
    assert stats.seeds_needed(0.0, 0.04) == 6  # never below at_least
    assert stats.seeds_needed(0.001, 0.04, at_least=3) == 3
    assert stats.seeds_needed(1.0, 0.04) == 64  # nothing up to at_most qualifies
    assert stats.seeds_needed(float("nan"), 0.04, at_most=20) == 20
    with pytest.raises(ValueError):
        stats.seeds_needed(0.03, 0.0)


def test_seeds_needed_is_the_smallest_qualifying_n():
    from scipy.stats import t

    for sd in np.linspace(0.005, 0.06, 23):
        n = stats.seeds_needed(sd, 0.04)

        def width(k, sd=sd):
            return 2 * t.ppf(0.975, k - 1) * sd / math.sqrt(k)

        if n < 64:
            assert width(n) < 0.04
        if n > 6:
            assert width(n - 1) >= 0.04


def _replay(a, b, reps, level, seed):
    """The bootstrap one replicate at a time, with the draws its docstring names (one chunk)."""
    n = len(a)
    sizes = np.array([len(x) for x in a])
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, n, size=(reps, n))
    prompts = rng.integers(0, sizes[chosen][..., None], size=(reps, n, sizes.max()))
    reps_vals = []
    for r in range(reps):
        seed_means = []
        for m in range(n):
            j = chosen[r, m]
            qs = prompts[r, m, :sizes[j]]
            seed_means.append(sum(a[j][q] - b[j][q] for q in qs) / sizes[j])
        reps_vals.append(sum(seed_means) / n)
    return reps_vals, np.quantile(reps_vals, [(1 - level) / 2, (1 + level) / 2])


def test_bootstrap_against_an_explicit_loop():
    a = [[1.0, 0.5, 0.0, 1.0], [0.25, 0.75, 1.0], [0.0, 0.0, 0.5, 1.0, 1.0]]
    b = [[0.5, 0.5, 0.25, 0.0], [0.25, 0.0, 1.0], [0.5, 0.0, 0.0, 1.0, 0.75]]
    assert stats.bootstrap_chunk(3, 5) >= 9  # one chunk: the replay below draws as the function does
    _, (lo, hi) = _replay(a, b, 9, 0.8, 3)
    r = stats.bootstrap_interval(a, b, reps=9, level=0.8, seed=3)
    assert math.isclose(r["lo"], lo, abs_tol=1e-12) and math.isclose(r["hi"], hi, abs_tol=1e-12)
    # the point estimate is the plain mean over seeds of the per-seed mean differences
    plain = (np.mean(np.subtract(a[0], b[0])) + np.mean(np.subtract(a[1], b[1])) + np.mean(np.subtract(a[2], b[2]))) / 3
    assert math.isclose(r["mean"], plain)
    assert math.isclose(plain, (1.25 / 4 + 0.75 / 3 + 0.25 / 5) / 3)  # per-seed sums of a - b by hand


def test_bootstrap_mean_interval_and_shrinking():
    rng = np.random.default_rng(0)

    def data(prompts):
        a = [(rng.random(prompts) < 0.6).astype(float) for _ in range(6)]
        b = [(rng.random(prompts) < 0.5).astype(float) for _ in range(6)]
        return a, b

    a, b = data(40)
    r = stats.bootstrap_interval(a, b, reps=4000)
    plain = float(np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    assert math.isclose(r["mean"], plain)
    assert r["lo"] < plain < r["hi"]
    a2, b2 = data(640)  # 16x the prompts: about a quarter of the width
    r2 = stats.bootstrap_interval(a2, b2, reps=4000)
    assert r2["lo"] < r2["mean"] < r2["hi"]
    assert (r2["hi"] - r2["lo"]) < 0.4 * (r["hi"] - r["lo"])
    # the same seed gives the same interval; more replicates than one chunk work
    assert stats.bootstrap_chunk(6, 40) < 4000
    assert stats.bootstrap_interval(a, b, reps=4000) == r
    assert stats.bootstrap_chunk(64, 256) * 64 * 256 <= stats.BOOTSTRAP_MAX_DRAWS


def test_bootstrap_pairs_by_prompt():
    # a = b + 0.25 on every prompt: any resampling that keeps the pairs gives exactly 0.25
    rng = np.random.default_rng(1)
    b = [rng.random(30) for _ in range(4)]
    a = [x + 0.25 for x in b]
    r = stats.bootstrap_interval(a, b, reps=500)
    assert math.isclose(r["lo"], 0.25) and math.isclose(r["hi"], 0.25) and math.isclose(r["mean"], 0.25)


def test_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired by seed"):
        stats.bootstrap_interval([[1.0]], [[1.0], [0.0]])
    with pytest.raises(ValueError, match="paired by prompt"):
        stats.bootstrap_interval([[1.0, 0.0]], [[1.0]])
