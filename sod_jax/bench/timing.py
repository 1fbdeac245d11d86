"""Wall-clock helpers shared by the benches."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds (fn must block until done)."""

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_time_pair(ours: Callable, baseline: Callable, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` wall times of two functions run alternately, so both see the same
    machine conditions (a shared machine's speed drifts between runs)."""

    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, baseline)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]
