"""The demo's synthetic multi-step tool task (``data_source = "demo_chain"``).

A problem is a chain of 2-3 computations on 2-3 digit constants::

    x1 = 347*28
    x2 = x1+915
    x3 = x2-604
    Find x3.

Each step is one ``code_interpreter`` call whose code is the step with the earlier result *copied in*
(``9716+915``): variables do not survive between sandbox runs, so the printed result of step k must
be copied from its tool response into the code of step k+1. Intermediate values stay in
``[0, 999999]`` (at most 6 digits). The answer is the last value as ``\\boxed{N}``; the checker is
the strict last-``\\boxed{}`` string match. A miscopied digit early on makes every later tool
output wrong: the cascading error SOD weights down.

Splits are generated from seeds (train and held-out use disjoint seed streams and are checked for
overlap) and written as parquet in the Open-AgentRL RL row layout; expert SFT trajectories run every
step's code in the real sandbox and carry the tool's actual output (the same text the agent shows
the model: :func:`sod_jax.rollout.tools.tool_text`).
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from sod_jax.chat import CODE_INTERPRETER_TOOL
from sod_jax.demo.rows import distinct_problems, make_rl_row, seeded_splits, tool_call, write_parquet, write_rl_splits
from sod_jax.rollout.tools import prepare_code, tool_text
from sod_jax.sandbox.protocol import run_request

DATA_SOURCE = "demo_chain"
MAX_VALUE = 999_999  # intermediate values have at most 6 digits
OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Problem:
    """One chain: ``x1 = a op b``, ``x_k = x_{k-1} op c_k``."""

    first: int
    ops: tuple[str, ...]  # one per step
    operands: tuple[int, ...]  # one per step (the right operand)
    values: tuple[int, ...]  # x1..xK

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    @property
    def answer(self) -> int:
        return self.values[-1]

    def expression(self, k: int) -> str:
        """Right-hand side of step k (0-based) as written in the problem (``x1+915``)."""
        left = str(self.first) if k == 0 else f"x{k}"
        return f"{left}{self.ops[k]}{self.operands[k]}"

    def code(self, k: int, previous: Optional[str] = None) -> str:
        """Code of step k with the earlier result copied in (``previous``: the printed value)."""
        left = str(self.first) if k == 0 else (previous if previous is not None else str(self.values[k - 1]))
        return f"{left}{self.ops[k]}{self.operands[k]}"

    def text(self) -> str:
        lines = [f"x{k + 1} = {self.expression(k)}" for k in range(self.num_steps)]
        lines.append(f"Find x{self.num_steps}.")
        return "\n".join(lines)


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _constant(rng: random.Random) -> int:
    return rng.randint(10, 999)  # 2-3 digits


def sample_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3) -> Problem:
    """A random chain whose values all lie in ``[0, MAX_VALUE]``."""
    k = rng.randint(min_steps, max_steps)
    first = _constant(rng)
    x = first
    ops, operands, values = [], [], []
    for _ in range(k):
        while True:
            op, y = rng.choice(OPS), _constant(rng)
            v = _apply(x, op, y)
            if 0 <= v <= MAX_VALUE:
                break
        ops.append(op)
        operands.append(y)
        values.append(v)
        x = v
    return Problem(first, tuple(ops), tuple(operands), tuple(values))


_LINE = re.compile(r"^x(\d+) = (x\d+|\d+)([+\-*])(\d+)$")


def parse_problem(text: str) -> Optional[Problem]:
    """The :class:`Problem` written as ``text`` (what :meth:`Problem.text` writes), or None when the
    text is not a chain (another task's prompt)."""
    lines = text.strip().splitlines()
    if len(lines) < 2 or not re.fullmatch(r"Find x\d+\.", lines[-1].strip()):
        return None
    first, ops, operands, values = None, [], [], []
    for k, line in enumerate(lines[:-1]):
        m = _LINE.match(line.strip())
        if m is None or int(m.group(1)) != k + 1:
            return None
        left = m.group(2)
        if k == 0:
            if left.startswith("x"):
                return None
            first = int(left)
            x = first
        elif left != f"x{k}":
            return None
        ops.append(m.group(3))
        operands.append(int(m.group(4)))
        x = _apply(x, ops[-1], operands[-1])
        values.append(x)
    return Problem(first, tuple(ops), tuple(operands), tuple(values))


def failed_steps(problem: Problem, tool_outputs: Sequence[Optional[str]]) -> list[bool]:
    """Per assistant turn: did the tool output after it miss the step's true value? Turn k (0-based)
    is meant to compute ``x_{k+1}``; a turn past the last step, or one without a tool call, counts
    as failed (it did not produce the step's value)."""
    out = []
    for k, text in enumerate(tool_outputs):
        if k >= problem.num_steps:
            out.append(text is not None)  # a final answer turn has no tool output: not a failure
            continue
        out.append(text is None or text.strip() != str(problem.values[k]))
    return out


def make_problems(n: int, seed: int, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """``n`` distinct problems from ``seed`` (none equal to one in ``exclude``)."""
    return distinct_problems(sample_problem, n, seed, exclude)


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Held-out from seed ``seed + 1``, train from ``seed`` excluding every held-out problem."""
    return seeded_splits(sample_problem, n_train, n_heldout, seed)


# ---------------------------------------------------------------------------------------------
# The checker (strict last-\boxed{} string match)
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text`` (stripped), or None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def score(solution: str, ground_truth: Any) -> dict:
    """``{"score", "acc", "pred"}`` as the reward registry returns them: 1.0 iff the last boxed answer
    equals the ground truth as a string."""
    pred = last_boxed(solution)
    acc = pred is not None and pred == str(ground_truth).strip()
    return {"score": 1.0 if acc else 0.0, "acc": bool(acc), "pred": pred or ""}


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def rl_row(p: Problem, index: int, split: str) -> dict:
    """One Open-AgentRL RL/eval row."""
    return make_rl_row(DATA_SOURCE, p, index, split)


def expert_messages(p: Problem, outputs: Sequence[str]) -> list[dict]:
    """The expert conversation given each step's tool text ``outputs`` (what the sandbox printed)."""
    msgs: list[dict] = [{"role": "user", "content": p.text()}]
    previous = None
    for k in range(p.num_steps):
        # The think text restates the step's line of the problem: the model copies it (an induction
        # copy), then writes the code from it with the previous printed result copied in.
        msgs.append({"role": "assistant", "content": f"<think>\nx{k + 1} = {p.expression(k)}\n</think>\n\n",
                     "tool_calls": [tool_call(p.code(k, previous))]})
        msgs.append({"role": "tool", "content": outputs[k]})
        previous = outputs[k].strip()
    msgs.append({"role": "assistant", "content": f"<think>\ndone\n</think>\n\n\\boxed{{{previous}}}"})
    return msgs


async def expert_outputs(problems: Sequence[Problem], sandbox: Any, max_output_chars: int = 256,
                         concurrency: int = 16, bar: Any = None) -> list[list[str]]:
    """Run every step of every problem in the sandbox, each step on the previous step's real output;
    the tool texts per problem. Raises if the sandbox disagrees with the arithmetic."""

    sem = asyncio.Semaphore(concurrency)

    async def one(p: Problem) -> list[str]:
        async with sem:  # whole problems at a time, so finished ones stream out
            return await steps(p)

    async def steps(p: Problem) -> list[str]:
        outs, previous = [], None
        for k in range(p.num_steps):
            resp = await sandbox.run(run_request(prepare_code(p.code(k, previous))))
            text = tool_text(resp, max_output_chars)
            if resp.get("status") != "Success" or text.strip() != str(p.values[k]):
                raise RuntimeError(f"sandbox gave {text!r} for step {k + 1} of {p.text()!r} "
                                   f"(expected {p.values[k]}): {resp}")
            outs.append(text)
            previous = text.strip()
        if bar is not None:
            bar.update(1)
        return outs

    return list(await asyncio.gather(*[one(p) for p in problems]))


def sft_rows(problems: Sequence[Problem], sandbox_factory: Any = None, progress: bool = True) -> list[dict]:
    """Expert SFT rows (``messages`` with ``tool_calls``, ``tools``) with real sandbox outputs.
    ``sandbox_factory()`` makes the sandbox (default: the local executor with 4 workers)."""

    if sandbox_factory is None:
        from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

        def sandbox_factory():
            return LocalSandbox(LocalSandboxConfig(workers=4))

    async def run() -> list[list[str]]:
        sandbox = sandbox_factory()
        try:
            with tqdm(total=len(problems), desc="expert trajectories", unit="problem", disable=not progress) as bar:
                return await expert_outputs(problems, sandbox, bar=bar)
        finally:
            await sandbox.close()

    outputs = asyncio.run(run())
    return [{"messages": expert_messages(p, o), "tools": [CODE_INTERPRETER_TOOL]} for p, o in zip(problems, outputs)]


def write_dataset(out_dir: Path, n_train: int = 4000, n_heldout: int = 256, n_sft: int = 4000, seed: int = 0,
                  n_eval: int = 64, sandbox_factory: Any = None, progress: bool = True) -> dict[str, Path]:
    """``train.parquet`` / ``heldout.parquet`` / ``heldout_eval.parquet`` (RL rows) and ``sft_train.parquet`` (expert rows for the
    first ``n_sft`` train problems, real tool outputs) under ``out_dir``."""
    out_dir = Path(out_dir)
    train, heldout = make_splits(n_train, n_heldout, seed)
    paths = write_rl_splits(out_dir, train, heldout, n_eval, rl_row)
    if n_sft:
        rows = sft_rows(train[:n_sft], sandbox_factory, progress)
        paths["sft_train"] = write_parquet(rows, out_dir / "sft_train.parquet")
    return paths
