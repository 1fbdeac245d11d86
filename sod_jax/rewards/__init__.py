"""Reward functions in verl's convention, a source registry and a batch pool.

``compute_score(data_source, solution, ground_truth, extra_info=None) -> {"score", "acc", "pred"}``
scores one response text (the whole response, assistant and tool turns, decoded without special
tokens). :class:`RewardPool` scores batches off the hot path with per-item timeouts.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

from sod_jax.rewards.code import extract_code, score_code
from sod_jax.rewards.math import last_boxed, score_math_verify, score_strict
from sod_jax.rewards.pool import RewardPool
from sod_jax.rewards.registry import BUILTIN_SOURCES, SCORERS, UnknownSourceError, check_sources, scorer_of, source_map

__all__ = ["BUILTIN_SOURCES", "SCORERS", "RewardPool", "UnknownSourceError", "check_sources", "compute_score",
           "extract_code", "last_boxed", "response_text", "score_code", "score_math_verify", "score_strict", "scorer_of",
           "source_map"]


def _run(coro):
    """Run a coroutine to completion, also when the caller is inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("v", asyncio.run(coro)))
    t.start()
    t.join()
    return box["v"]


def response_text(tokenizer: Any, response_ids: Any) -> str:
    """The text that is scored: the whole response (assistant and tool turns) decoded without special
    tokens, as the reference does (``<think>``, ``<tool_call>`` and the like are ordinary added tokens
    in Qwen3's vocabulary and stay; ``<|im_end|>``, ``<|im_start|>`` go)."""
    return tokenizer.decode(list(response_ids), skip_special_tokens=True)


def compute_score(data_source: str, solution: str, ground_truth: Any, extra_info: Optional[dict] = None, *,
                  reward_cfg: Any = None, sandbox: Any = None) -> dict:
    """Score one response. ``reward_cfg`` (the ``reward`` section) adds ``reward.sources`` and
    ``reward.math_verify``; code sources run their tests in ``sandbox`` (default: a fresh
    :class:`~sod_jax.sandbox.LocalSandbox`). No timeout here: :class:`RewardPool` adds them."""
    scorer = scorer_of(data_source, getattr(reward_cfg, "sources", None))
    if scorer == "code":
        case_timeout = float(getattr(reward_cfg, "case_timeout", 6.0))

        async def go():
            sb = sandbox
            if sb is None:
                from sod_jax.sandbox import LocalSandbox

                sb = LocalSandbox()
            return await score_code(solution, ground_truth, sb, case_timeout=case_timeout)

        return _run(go())
    if scorer == "math" and getattr(reward_cfg, "math_verify", False):
        return score_math_verify(solution, str(ground_truth))
    return score_strict(solution, str(ground_truth))
