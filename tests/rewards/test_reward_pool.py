"""RewardPool: order, mixed sources, asynchronous submit, and checks that hang or crash."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from sod_jax.config import load_config
from sod_jax.rewards import RewardPool, UnknownSourceError


def reward_cfg(*overrides):
    return load_config(None, ["algo.name=grpo", "reward.workers=2", *overrides]).reward


def test_mixed_batch_in_order():
    items = [
        {"data_source": "AIME2024", "solution": "\\boxed{5}", "ground_truth": "5", "extra_info": {}},
        {"data_source": "LiveCodeBench_v6", "solution": "```python\nprint(int(input()) * 2)\n```",
         "ground_truth": {"inputs": ["2\n", "3\n"], "outputs": ["4\n", "7\n"]}},
        {"data_source": "gpqa_diamond", "solution": "\\boxed{C}", "ground_truth": "D"},
    ]
    with RewardPool(reward_cfg()) as pool:
        fut = pool.submit(items)
        out = fut.result()
        assert [o["score"] for o in out] == [1.0, 0.5, -1.0]
        assert [o["acc"] for o in out] == [True, False, False] and out[1]["pred"] == "print(int(input()) * 2)\n"
        assert all(o["error"] is None for o in out)
        with pytest.raises(UnknownSourceError, match="nope"):
            pool.score([{"data_source": "nope", "solution": "", "ground_truth": "1"}])


def test_math_verify_in_workers():
    items = [{"data_source": "math", "solution": f"\\boxed{{{p}}}", "ground_truth": "\\frac{1}{2}"}
             for p in ("0.5", "1/2", "0.25", "")]
    with RewardPool(reward_cfg("reward.math_verify=true")) as pool:
        assert [o["acc"] for o in pool.score(items)] == [True, True, False, False]


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    (tmp_path / "slow_checks.py").write_text(textwrap.dedent("""
        import os, time
        from sod_jax.rewards.pool import score_text

        def check(scorer, solution, ground_truth, math_verify):
            if solution == "hang":
                time.sleep(3600)
            if solution == "die":
                os._exit(7)
            if solution == "raise":
                raise ValueError("bad check")
            return score_text(scorer, solution, ground_truth, math_verify)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    return "slow_checks:check"


@pytest.mark.slow
def test_hanging_and_crashing_checks_score_wrong(slow_module):
    sols = ["\\boxed{1}", "hang", "\\boxed{1}", "die", "raise", "\\boxed{2}", "hang", "\\boxed{1}"]
    items = [{"data_source": "math", "solution": s, "ground_truth": "1"} for s in sols]
    pool = RewardPool(reward_cfg("reward.timeout=2.0"), worker_fn=slow_module)
    try:
        out = pool.score(items)  # returns although two checks never finish
        assert [o["score"] for o in out] == [1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
        assert [o["error"] for o in out] == [None, "timeout", None, "the scoring worker died",
                                             "ValueError: bad check", None, "timeout", None]
        assert pool.stats["timeouts"] == 2 and pool.stats["errors"] == 2
        # the pool still works after killing and replacing workers
        assert [o["acc"] for o in pool.score(items[:1])] == [True]
    finally:
        pool.close()


def test_a_sandbox_shared_with_another_event_loop():
    from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request

    sb = LocalSandbox(LocalSandboxConfig(workers=1))

    async def busy():  # the agent's loop: more runs than workers, so the executor's queue binds to it
        return await asyncio.gather(*(sb.run(run_request("print(1)")) for _ in range(3)))

    assert [r["status"] for r in asyncio.run(busy())] == ["Success"] * 3
    item = {"data_source": "code", "solution": "```python\nprint(int(input()) + 1)\n```",
            "ground_truth": {"inputs": ["1", "2", "3"], "outputs": ["2", "3", "4"]}}
    with RewardPool(reward_cfg(), sandbox=sb) as pool:
        assert [o["score"] for o in pool.score([item] * 3)] == [1.0] * 3
