"""At-k metrics against exact rational arithmetic, hand-computed cases and a straight re-computation
of the reference's bootstrap (global legacy numpy RNG, one resample at a time)."""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

from sod_jax.evaluation.metrics import (
    avg_at_k,
    bootstrap_ks,
    bootstrap_metrics,
    maj_at_k,
    pass_at_k,
    prompt_bootstrap,
    validation_metrics,
)


def test_pass_at_k_is_exact():
    for n in (1, 2, 5, 16, 32, 1024):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
            for k in sorted({1, 2, n // 4, n // 2, n - 1, n} - {0, -1}):
                if k > n:
                    continue
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == float(exact), (n, c, k)
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 32, 1) == 1.0 and pass_at_k(1024, 1, 1024) == 1.0
    assert pass_at_k(1024, 3, 1) == 3 / 1024


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 5, 1), (4, -1, 1), (4, 1, 0), (0, 0, 1), (4.0, 1, 1)])
def test_pass_at_k_rejects(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k_by_hand():
    correct = [[True, False, True, True], [False, False, False, True], [True, True, True, True]]
    assert avg_at_k(correct, 1) == pytest.approx((1 + 0 + 1) / 3)
    assert avg_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert avg_at_k(correct, 4) == pytest.approx((0.75 + 0.25 + 1) / 3)
    with pytest.raises(ValueError, match="fewer than k=5"):
        avg_at_k(correct, 5)


def test_maj_at_k_by_hand():
    preds = [
        ["3", "4", "4", "3"],  # tie 3 vs 4 at k=4: "3" seen first -> its first occurrence (correct)
        ["", "", "7", ""],  # empty preds never vote: "7" wins (wrong)
        ["", "", "", ""],  # nothing extracted: unsolved
        ["1", "2", "2", "2"],  # "2" wins at k=4; at k=2 tie -> "1" (correct)
    ]
    correct = [
        [True, False, False, True],
        [False, False, False, False],
        [False, False, False, False],
        [True, False, False, False],
    ]
    assert maj_at_k(preds, correct, 4) == pytest.approx(1 / 4)
    assert maj_at_k(preds, correct, 2) == pytest.approx(2 / 4)  # prompt 0: tie 3/4 -> "3"; prompt 3: "1"
    assert maj_at_k(preds, correct, 1) == pytest.approx(2 / 4)
    # the first occurrence's correctness counts, not a later one of the same answer
    assert maj_at_k([["5", "5"]], [[False, True]], 2) == 0.0


def test_bootstrap_hand_computed():
    # RandomState(42): choice(3, 2) x4 -> [2,0] [2,2] [0,0] [2,1]; choice(3, 3) x4 -> [2,0,2] [2,0,0] [2,1,2] [2,2,2]
    fig = prompt_bootstrap([1, 0, 0], ["a", "b", "b"], n_bootstrap=4, seed=42)
    assert fig["mean@3"] == pytest.approx(1 / 3) and fig["std@3"] == pytest.approx(np.std([1, 0, 0]))
    # k=2: best 1,0,1,0; worst 0,0,1,0; maj (ties to the first seen) b->0, b->0, a->1, b->0
    assert fig["best@2/mean"] == 0.5 and fig["worst@2/mean"] == 0.25 and fig["maj@2/mean"] == 0.25
    # k=3: best 1,1,0,0; worst 0,0,0,0; maj b->0, a->1, b->0, b->0
    assert fig["best@3/mean"] == 0.5 and fig["worst@3/mean"] == 0.0 and fig["maj@3/mean"] == 0.25
    assert fig["best@2/std"] == pytest.approx(0.5)
    assert bootstrap_ks(32) == [2, 4, 8, 16, 32] and bootstrap_ks(5) == [2, 4, 5]


def reference_bootstrap(data_sources, prompts, infos, seed=42):
    """The reference computation written out: global RNG seeded before every metric, one
    np.random.choice per resample, dict-based majority vote."""

    def boot(data, k, fns):
        np.random.seed(seed)
        lists = [[] for _ in fns]
        for _ in range(1000):
            sample = [data[i] for i in np.random.choice(len(data), size=k, replace=True)]
            for j, fn in enumerate(fns):
                lists[j].append(fn(sample))
        return [(np.mean(x), np.std(x)) for x in lists]

    def maj(sample):
        vote2vals = defaultdict(list)
        for d in sample:
            vote2vals[d["pred"]].append(d["val"])
        cnt = {key: len(v) for key, v in vote2vals.items()}
        return vote2vals[max(cnt, key=cnt.get)][0]

    grouped = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for i, src in enumerate(data_sources):
        for var, vals in infos.items():
            grouped[src][prompts[i]][var].append(vals[i])
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for src, p2 in grouped.items():
        for _, var2 in p2.items():
            for var, vals in var2.items():
                if isinstance(vals[0], str):
                    continue
                n = len(vals)
                m = {f"mean@{n}": np.mean(vals), f"std@{n}": np.std(vals)}
                ks, k = [], 2
                while k < n:
                    ks.append(k)
                    k *= 2
                for k in ks + [n]:
                    (bm, bs), (wm, ws) = boot(vals, k, [np.max, np.min])
                    m[f"best@{k}/mean"], m[f"best@{k}/std"], m[f"worst@{k}/mean"], m[f"worst@{k}/std"] = bm, bs, wm, ws
                    [(mm, ms)] = boot([{"val": v, "pred": p} for v, p in zip(vals, var2["pred"])], k, [maj])
                    m[f"maj@{k}/mean"], m[f"maj@{k}/std"] = mm, ms
                for name, x in m.items():
                    out[src][var][name].append(x)
    return {s: {v: {k: float(np.mean(x)) for k, x in m.items()} for v, m in v2.items()} for s, v2 in out.items()}


def test_bootstrap_matches_the_reference_computation():
    rng = np.random.default_rng(0)
    n, prompts = 8, 5
    srcs, pids, acc, preds = [], [], [], []
    for p in range(prompts):
        for _ in range(n):
            srcs.append("AIME2024" if p < 3 else "gpqa_diamond")
            pids.append(f"q{p}")
            ans = str(rng.integers(0, 3))
            preds.append(ans if rng.random() > 0.2 else "")
            acc.append(float(preds[-1] == "1"))
    state = np.random.get_state()
    ours = bootstrap_metrics(srcs, pids, {"acc": acc}, preds)
    assert all(a == b for a, b in zip(np.random.get_state()[1], state[1]))  # global RNG untouched
    ref = reference_bootstrap(srcs, pids, {"acc": acc, "pred": preds})
    assert set(ours) == set(ref)
    for src in ref:
        assert set(ours[src]["acc"]) == set(ref[src]["acc"])
        for name, x in ref[src]["acc"].items():
            assert ours[src]["acc"][name] == pytest.approx(x, abs=1e-12), (src, name)
    flat = validation_metrics(ours)
    core = sorted(k for k in flat if k.startswith("val-core/AIME2024"))
    assert core == ["val-core/AIME2024/acc/best@8/mean", "val-core/AIME2024/acc/best@8/std",
                    "val-core/AIME2024/acc/maj@8/mean", "val-core/AIME2024/acc/maj@8/std",
                    "val-core/AIME2024/acc/mean@8"]
    assert "val-aux/AIME2024/acc/std@8" in flat and "val-aux/AIME2024/acc/best@4/mean" in flat and "val-aux/gpqa_diamond/acc/worst@2/mean" in flat
