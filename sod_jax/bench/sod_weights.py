"""Jitted SOD step weights against a per-token Python loop (the reference's approach)."""

from __future__ import annotations

import argparse

import jax
import numpy as np

from sod_jax.algo.sod import step_weights
from sod_jax.bench.timing import best_time


def loop_step_weights(s, q, m, eps: float, delta: float):
    """Per-token Python loop over rows and tokens (how the reference computes SOD weights)."""

    B, T = m.shape
    out = np.zeros((B, T), np.float32)
    for b in range(B):
        sums, lens, spans = [], [], []
        inside = False
        for t in range(T):
            if m[b, t]:
                if not inside:
                    sums.append(0.0)
                    lens.append(0)
                    spans.append([t, t])
                    inside = True
                sums[-1] += abs(s[b, t] - q[b, t])
                lens[-1] += 1
                spans[-1][1] = t + 1
            else:
                inside = False
        prod = 1.0
        prev = None
        for k, (a, e) in enumerate(spans):
            d = sums[k] / lens[k]
            if k == 0:
                w = 1.0
            else:
                prod *= (prev + eps) / (d + eps)
                w = min(prod, 1.0 + delta)
            prev = d
            for t in range(a, e):
                out[b, t] = w
    return out


def run(args: argparse.Namespace) -> list[dict]:
    B, T, K = args.batch, args.seq, args.steps
    rng = np.random.RandomState(0)
    s = -rng.exponential(1.0, (B, T)).astype(np.float32)
    q = -rng.exponential(1.0, (B, T)).astype(np.float32)
    m = np.zeros((B, T), np.int32)
    for b in range(B):  # K assistant turns separated by tool outputs, random lengths
        cuts = np.sort(rng.choice(np.arange(1, T), 2 * K - 1, replace=False))
        bounds = np.concatenate([[0], cuts, [T]])
        for k in range(K):
            m[b, bounds[2 * k]:bounds[2 * k + 1]] = 1
    s_d, q_d, m_d = map(jax.device_put, (s, q, m))
    fn = lambda: step_weights(s_d, q_d, m_d, 1e-6, 0.2).block_until_ready()  # noqa: E731
    fn()  # compile
    ours = best_time(fn, args.repeats)
    ref = loop_step_weights(s, q, m, 1e-6, 0.2)
    base = best_time(lambda: loop_step_weights(s, q, m, 1e-6, 0.2), 1)
    diff = float(np.abs(np.asarray(step_weights(s_d, q_d, m_d, 1e-6, 0.2)) - ref).max())
    return [{"bench": "sod-weights", "B": B, "T": T, "steps_per_row": K, "ours": round(B * T / ours),
             "baseline": round(B * T / base), "ratio": round(base / ours, 1), "unit": "tokens/s",
             "ours_ms": round(ours * 1e3, 3), "baseline_ms": round(base * 1e3, 1),
             "max_abs_diff": diff, "device": jax.devices()[0].platform}]


def add_parser(sub) -> None:
    p = sub.add_parser("sod-weights", help="jitted step weights vs a per-token Python loop (higher ratio is better)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="assistant turns per row")
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(fn=run)
