"""Synthetic multi-turn tool conversations (SFT row layout) for the SFT and eval tests."""

from __future__ import annotations

import json
import random

from sod_jax.chat import CODE_INTERPRETER_TOOL


def tool_conversation(a: int, b: int, c: int, system: bool = True) -> dict:
    """A 3-turn tool conversation with thinking text: two code_interpreter calls, then the boxed answer."""
    s1, s2 = a + b, (a + b) * c
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] if system else []
    msgs += [
        {"role": "user", "content": f"Compute ({a} + {b}) * {c}."},
        {"role": "assistant", "content": f"<think>\nFirst add {a} and {b} with Python.\n</think>\n\n",
         "tool_calls": [{"type": "function", "function": {"name": "code_interpreter",
                                                           "arguments": {"code": f"print({a} + {b})"}}}]},
        {"role": "tool", "content": f"{s1}"},
        {"role": "assistant", "content": f"<think>\nNow multiply {s1} by {c}.\n</think>\n\nNext step.",
         "tool_calls": [{"type": "function", "function": {"name": "code_interpreter",
                                                           "arguments": {"code": f"print({s1} * {c})"}}}]},
        {"role": "tool", "content": f"{s2}"},
        {"role": "assistant", "content": f"<think>\nThe result is {s2}.\n</think>\n\nThe answer is \\boxed{{{s2}}}."},
    ]
    return {"messages": msgs, "tools": [CODE_INTERPRETER_TOOL]}


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"messages": r["messages"], "tools": json.dumps(r["tools"])}) + "\n")


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [tool_conversation(rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9), system=bool(i % 2))
            for i in range(n)]
