"""What one RL step's rollouts produced on this process, and the figures and lines made from them
(the step's rollout metrics, the logged step-weight samples, the progress lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from sod_jax.rollout.agent import tool_error_rate


@dataclass
class StepRollouts:
    """What one step's rollouts produced on this process."""

    trajectories: list
    rows: list  # the data rows, one per trajectory
    group_ids: list[int]
    scores: list[dict]
    rewards: list[float]
    seconds: float
    reward_seconds: float


_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.S)


def turn_tool_outputs(tokenizer: Any, traj: Any, max_chars: int = 80) -> list[Optional[str]]:
    """Per assistant turn of ``traj``: the text of the tool responses that follow it (several calls
    joined by newlines, cut to ``max_chars``), or None when the turn made no tool call."""
    spans = list(traj.turn_spans)
    out: list[Optional[str]] = []
    for k, (_, end) in enumerate(spans):
        nxt = spans[k + 1][0] if k + 1 < len(spans) else len(traj.response_ids)
        found = _TOOL_RESPONSE.findall(tokenizer.decode(traj.response_ids[end:nxt])) if nxt > end else []
        out.append("\n".join(found)[:max_chars] if found else None)
    return out


FINISH_REASONS = ("stop", "length", "max_turns", "parse_error", "engine_error", "context", "stop_string")


def trajectory_table(ro: StepRollouts) -> np.ndarray:
    """One row of figures per trajectory (``[n, 9]`` float64): acc, score, response length, turns,
    tool calls run, tool errors, generated tokens, finish-reason code (index in :data:`FINISH_REASONS`,
    -1 for another reason), tool calls that could not run."""
    code = {r: i for i, r in enumerate(FINISH_REASONS)}
    return np.asarray([[bool(s.get("acc")), s["score"], len(t.response_ids), t.num_turns, t.num_tool_calls,
                        t.num_tool_errors, sum(t.response_mask), code.get(t.finish_reason, -1),
                        t.num_invalid_calls]
                       for t, s in zip(ro.trajectories, ro.scores)], np.float64).reshape(-1, 9)


def rollout_metrics(ro: StepRollouts, table: Optional[np.ndarray] = None) -> dict:
    """Rollout figures of one step: accuracy, score, lengths, turns, tool use, finish reasons. ``table``:
    the :func:`trajectory_table` rows of every process (the whole global batch; default: this
    process's); the throughput is the table's tokens over this process's rollout time (the processes
    sample at the same time)."""
    t = trajectory_table(ro) if table is None else table
    n = len(t)
    calls, errors, gen = t[:, 4].sum(), t[:, 5].sum(), t[:, 6].sum()
    m = {
        "acc": float(t[:, 0].mean()),
        "score_mean": float(t[:, 1].mean()),
        "response_length_mean": float(t[:, 2].mean()),
        "response_length_max": int(t[:, 2].max()),
        "turns_mean": float(t[:, 3].mean()),
        "tool_calls_mean": float(calls / n),
        "tool_error_rate": tool_error_rate(errors, calls, t[:, 8].sum()),
        "rollout_tokens_per_s": float(gen / max(ro.seconds, 1e-9)),
        "generated_tokens": int(gen),
    }
    codes, counts = np.unique(t[:, 7].astype(int), return_counts=True)
    for c, k in zip(codes, counts):
        m[f"finish/{FINISH_REASONS[c] if c >= 0 else 'other'}"] = float(k / n)
    return m


def step_weight_samples(tokenizer: Any, metrics: dict, ro: StepRollouts, limit: int = 8) -> list[dict]:
    """The first ``limit`` trajectories' per-turn divergences ``d`` and weights ``w`` (SOD) with what a
    reader needs to tell which step went wrong: the prompt and each turn's tool output."""
    w, d = metrics.get("sample_step_w"), metrics.get("sample_step_d")
    if w is None or d is None:
        return []
    out = []
    for i in range(min(limit, len(w), len(ro.trajectories))):
        t = ro.trajectories[i]
        k = t.num_turns
        user = [m.get("content", "") for m in ro.rows[i].get("prompt", []) if m.get("role") == "user"]
        out.append({"row": i, "reward": ro.rewards[i], "tool_errors": t.num_tool_errors,
                    "d": [float(x) for x in d[i][:k]], "w": [float(x) for x in w[i][:k]],
                    # what a task-specific reader needs to tell which step went wrong (demo compare)
                    "prompt": (user[-1] if user else "")[:400], "tool_outputs": turn_tool_outputs(tokenizer, t)})
    return out


def step_line(m: dict) -> str:
    """One step's progress line."""
    parts = [f"reward {m.get('reward_mean', float('nan')):.3f}", f"acc {m.get('acc', float('nan')):.2f}"]
    if "kl_k1" in m:
        parts.append(f"kl {m['kl_k1']:.3f}")
    parts.append(f"turns {m.get('turns_mean', 0):.1f}")
    parts.append(f"len {m.get('response_length_mean', 0):.0f}")
    return " | ".join(parts)


def eval_line(summary: Optional[dict]) -> str:
    """One evaluation's progress line."""
    if not summary:
        return "no held-out data"
    parts = [f"{src} acc {d['acc']:.3f}" for src, d in summary.items() if isinstance(d, dict) and "acc" in d]
    if "heldout_kl" in summary:
        parts.append(f"held-out KL {summary['heldout_kl']:.4f}")
    return ", ".join(parts)
