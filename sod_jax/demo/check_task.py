"""The demo's checked chain task (``data_source = "demo_check"``): errors have consequences and a way back.

A problem names a start value and a chain of 2-3 additions, each step's rule on its own line with
a check value (the step's value mod 97), the rules listed in a shuffled order::

    a = 347
    x2 = x1+915 [check 42]
    x1 = a+28 [check 84]
    x3 = x2+604 [check 17]
    Find x3.

Each step is one ``code_interpreter`` call. Its think writes the step with the left operand's value
(turn 1: ``a`` from the prompt; turn k >= 2: ``x_{k-1}`` from the previous ``<tool_response>``) and
the operand and check of the step's rule, found by name among the shuffled lines; the code runs that
line, asserts the check and prints the value::

    <think>
    x2 = 9716+915, check 42
    </think>
    <tool_call>{"name": "code_interpreter", "arguments": {"code": "x2 = 9716+915\\nassert x2 % 97 == 42\\nprint(x2)"}}</tool_call>

Every turn does the same work (find its rule among the shuffled lines, copy its fields, substitute
the left operand's value), so turn 1's divergence is not structurally small. In a fixed order turn 1
could copy from a fixed place (line 2), which a small model learns long before it can find a later
step's line, and its divergence from the teacher stays far below theirs.

No first attempt writes the rule's own form (``x2 = x1+915 [check 42]``): the think and the code
write the step with the left operand's value, and a failed check's traceback echoes ``assert x2 % 97
== 42``. So a redo that re-reads the rule finds that form only in the prompt. In every layout whose
first attempts wrote the prompt's form (the rule restated in the think, or the prompt's line in the
code), students redid by copying their failed attempt, the most recent match (docs/demo.md).

One op, ``+``: with ``+``, ``-`` and ``*`` the op was the field every model learned last, and a
student restated the wrong op in its think while its code wrote the right one, a slip no check
catches, which put the teacher's largest disagreements on correct steps. The mechanism under study
is the check and the redo, not the op; the parser still reads all three.

A miscopied digit fails the check: the sandbox answers with a real traceback (``AssertionError``),
and the right action is to *redo* the step: ``check failed, redo`` in the think, every copied field
re-read at its source (the step's rule ``x2 = x1+915 [check 42]``, then ``x1 = 9716`` from the last
tool output; step 1: ``a = 347``), then the step again with the right digits. Three kinds of expert
trajectories are written:

* ``clean`` (the teacher's SFT data): every step right the first time; a model trained on them has
  never seen a failed check.
* ``recover`` (part of the student's SFT data): one step's first attempt has one miscopied digit,
  its real traceback, then the redo. The miscopied turn has ``"weight": 0`` (context, not a loss
  target): the student learns to recover from errors, not to make them; its own errors are those of
  an under-trained model.
* ``redo`` (the student's second SFT stage): every trajectory has a miscopied step, and the redo turn
  is its only target (every other assistant turn has weight 0): one stage on ``recover`` rows learns
  the redo later than the first attempts, so the second trains the redo alone.

:func:`turn_outcomes` reads a trajectory's tool outputs back into what each turn did (a step done,
a failed check, a wrong value, the answer), and :func:`error_recovery` says whether a trajectory
that failed a check went on to produce that step's value. The answer is ``\\boxed{x_K}`` (the strict
last-``\\boxed{}`` match of :func:`sod_jax.demo.task.score`).
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tqdm import tqdm

from sod_jax.chat import CODE_INTERPRETER_TOOL
from sod_jax.demo.rows import distinct_problems, make_rl_row, seeded_splits, tool_call, write_parquet, write_rl_splits
from sod_jax.demo.task import score  # noqa: F401 - the checker of this task too
from sod_jax.rollout.tools import prepare_code, tool_text
from sod_jax.sandbox.protocol import run_request

DATA_SOURCE = "demo_check"
MOD = 97
MAX_VALUE = 999_999
OPS = ("+",)  # one op: see the module docstring
FAILED_CHECK = "AssertionError"


@dataclass(frozen=True)
class Problem:
    """``x1 = a op_1 c_1``, ``x_k = x_{k-1} op_k c_k``; checks are ``x_k mod 97``."""

    a: int
    ops: tuple[str, ...]  # one per step
    operands: tuple[int, ...]  # right operand c_k per step
    values: tuple[int, ...]  # x1..xK
    order: tuple[int, ...]  # the 0-based step of each rule line, as the prompt lists them

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    @property
    def answer(self) -> int:
        return self.values[-1]

    def check(self, k: int) -> int:
        return self.values[k] % MOD

    def left(self, k: int) -> int:
        """The true left operand of step k (0-based): ``a``, else ``x_k``."""
        return self.a if k == 0 else self.values[k - 1]

    def text(self) -> str:
        lines = [f"a = {self.a}"]
        for k in self.order:
            lines.append(step_rule(k, self.ops[k], str(self.operands[k]), str(self.check(k))))
        lines.append(f"Find {name(self.num_steps)}.")
        return "\n".join(lines)


def name(k: int) -> str:
    """The name of value k: ``a`` (the start, k = 0), then ``x1``, ``x2``, ... (step k's result)."""
    return "a" if k == 0 else f"x{k}"


def step_rule(k: int, op: str, right: str, check: str) -> str:
    """Step k's (0-based) line as the prompt writes it: ``x1 = a+28 [check 84]``, then
    ``x2 = x1+915 [check 58]`` (``right`` is the operand as written)."""
    return f"{name(k + 1)} = {name(k)}{op}{right} [check {check}]"


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def sample_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3) -> Problem:
    """A random chain on 2-3 digit constants whose values all lie in ``[0, MAX_VALUE]``."""
    k = rng.randint(min_steps, max_steps)
    a = rng.randint(10, 999)
    x, ops, operands, values = a, [], [], []
    for _ in range(k):
        while True:
            op, y = rng.choice(OPS), rng.randint(10, 999)
            v = _apply(x, op, y)
            if 0 <= v <= MAX_VALUE:
                break
        ops.append(op)
        operands.append(y)
        values.append(v)
        x = v
    order = list(range(k))
    rng.shuffle(order)
    return Problem(a, tuple(ops), tuple(operands), tuple(values), tuple(order))


_STEP = re.compile(r"^x(\d+) = (a|x\d+)([+\-*])(\d+) \[check (\d+)\]$")


def parse_problem(text: str) -> Optional[Problem]:
    """The :class:`Problem` that :meth:`Problem.text` wrote, or None (another task's prompt)."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) < 3 or not re.fullmatch(r"Find x\d+\.", lines[-1]):
        return None
    ma = re.fullmatch(r"a = (\d+)", lines[0])
    if not ma:
        return None
    a = int(ma.group(1))
    rules = [_STEP.match(line) for line in lines[1:-1]]
    if not rules or any(m is None for m in rules):
        return None
    order = tuple(int(m.group(1)) - 1 for m in rules)
    if sorted(order) != list(range(len(rules))) or lines[-1] != f"Find {name(len(rules))}.":
        return None
    by_step = {k: m for k, m in zip(order, rules)}
    x, ops, operands, values = a, [], [], []
    for k in range(len(rules)):
        m = by_step[k]
        if m.group(2) != name(k):
            return None
        y = int(m.group(4))
        x = _apply(x, m.group(3), y)
        if x % MOD != int(m.group(5)):
            return None
        ops.append(m.group(3))
        operands.append(y)
        values.append(x)
    return Problem(a, tuple(ops), tuple(operands), tuple(values), order)


def make_problems(n: int, seed: int, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """``n`` distinct problems from ``seed`` (none equal to one in ``exclude``)."""
    return distinct_problems(sample_problem, n, seed, exclude)


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Held-out from seed ``seed + 1``; train from ``seed`` excluding every held-out problem."""
    return seeded_splits(sample_problem, n_train, n_heldout, seed)


# ---------------------------------------------------------------------------------------------
# Attempts: what one assistant turn writes for a step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One tool turn: step ``k`` (0-based) with the operands and check as written (strings, so a
    miscopied digit is representable). ``redo``: the turn after a failed check of the same step."""

    k: int
    left: str
    right: str
    check: str
    op: str
    redo: bool = False

    def think(self) -> str:
        # the step with the left operand's value and the rule's operand and check
        lines = [f"{self.step()}, check {self.check}"]
        if self.redo:
            # The redo first re-reads every copied field at its source: the step's rule as the
            # prompt writes it (operand, op, check; no first attempt writes that form, so the
            # prompt is its only source) and the left operand (the previous tool output; step 1:
            # the prompt's a). A student that redoes by copying its failed attempt repeats the
            # miscopy; one that copies from the sources recovers.
            lines = ["check failed, redo", step_rule(self.k, self.op, self.right, self.check),
                     f"{name(self.k)} = {self.left}", lines[-1]]
        return "<think>\n" + "\n".join(lines) + "\n</think>\n\n"

    def step(self) -> str:
        """``x2 = 9716+915``: the step with the left operand's value, as the think and the code write it."""
        return f"{name(self.k + 1)} = {self.left}{self.op}{self.right}"

    def code(self) -> str:
        v = name(self.k + 1)
        return f"{self.step()}\nassert {v} % {MOD} == {self.check}\nprint({v})"

    def passes(self) -> bool:
        """The assert holds (what the sandbox will say)."""
        return _apply(int(self.left), self.op, int(self.right)) % MOD == int(self.check)


def correct_attempt(p: Problem, k: int, redo: bool = False) -> Attempt:
    return Attempt(k, str(p.left(k)), str(p.operands[k]), str(p.check(k)), p.ops[k], redo)


def miscopy(s: str, rng: random.Random) -> str:
    """``s`` with one digit replaced by another (no leading zero)."""
    i = rng.randrange(len(s))
    digits = [d for d in "0123456789" if d != s[i] and not (i == 0 and d == "0" and len(s) > 1)]
    return s[:i] + rng.choice(digits) + s[i + 1:]


def error_attempt(p: Problem, k: int, rng: random.Random) -> Attempt:
    """Step k with one miscopied digit that fails the check, in the left value, the operand or the
    check alike: the students' own first errors fall on all three (the fields they look up)."""
    good = correct_attempt(p, k)
    for _ in range(100):
        field = rng.choices(("left", "right", "check"), weights=(1, 1, 1))[0]
        bad = Attempt(**{**good.__dict__, field: miscopy(getattr(good, field), rng)})
        if not bad.passes():
            return bad
    raise RuntimeError(f"no failing miscopy found for step {k + 1} of {p.text()!r}")


def plan_attempts(p: Problem, rng: random.Random, recover: bool) -> list[Attempt]:
    """The tool turns of an expert trajectory: each step once (``recover=False``), or with one
    step's first attempt miscopied and then redone (``recover=True``)."""
    bad_step = rng.randrange(p.num_steps) if recover else -1
    out = []
    for k in range(p.num_steps):
        if k == bad_step:
            out += [error_attempt(p, k, rng), correct_attempt(p, k, redo=True)]
        else:
            out.append(correct_attempt(p, k))
    return out


# ---------------------------------------------------------------------------------------------
# Reading a trajectory back
# ---------------------------------------------------------------------------------------------


def turn_outcomes(p: Problem, tool_outputs: Sequence[Optional[str]]) -> list[tuple[Optional[int], str]]:
    """Per assistant turn: ``(step, outcome)``. ``step`` is the 0-based step the turn was due to do
    (None past the last step); outcome ``ok`` (its tool printed the step's value), ``failed_check``
    (a traceback with ``AssertionError``), ``wrong`` (anything else from the tool: a wrong value, another
    error, no output), ``answer`` (no tool call: the final turn) or ``extra`` (a tool call after the
    last step was done)."""
    pending, out = 0, []
    for text in tool_outputs:
        if text is None:
            out.append((pending if pending < p.num_steps else None, "answer"))
            continue
        if pending >= p.num_steps:
            out.append((None, "extra"))
        elif text.strip() == str(p.values[pending]):
            out.append((pending, "ok"))
            pending += 1
        elif FAILED_CHECK in text:
            out.append((pending, "failed_check"))
        else:
            out.append((pending, "wrong"))
    return out


def failed_steps(p: Problem, tool_outputs: Sequence[Optional[str]]) -> list[bool]:
    """Per assistant turn: did its tool step fail (a failed check, a wrong value, a call past the end)?"""
    return [o in ("failed_check", "wrong", "extra") for _, o in turn_outcomes(p, tool_outputs)]


def error_recovery(prompt_text: str, tool_outputs: Sequence[Optional[str]]) -> Optional[bool]:
    """After the first failed check: did a later turn print that step's value? None when the prompt
    is not this task's or no check failed."""
    p = parse_problem(prompt_text or "")
    if p is None:
        return None
    outcomes = turn_outcomes(p, tool_outputs)
    first = next((i for i, (_, o) in enumerate(outcomes) if o == "failed_check"), None)
    if first is None:
        return None
    step = outcomes[first][0]
    return any(s == step and o == "ok" for s, o in outcomes[first + 1:])


def restated_op_slips(prompt_text: str, response: str) -> Optional[tuple[int, int]]:
    """``(rules, wrong_op)``: how many rule lines (``x2 = x1+915 [check 42]``) ``response`` restates
    for a step of the prompt's problem, and in how many of them the op is not the rule's. A wrong op
    there need not fail the check (the code may still write the right one), but the teacher, which
    copies rules reliably, puts its largest disagreements on it. None when the prompt is not this
    task's."""
    p = parse_problem(prompt_text or "")
    if p is None:
        return None
    rules = wrong = 0
    for line in (response or "").splitlines():
        m = _STEP.match(line.strip())
        if m is None or not 1 <= int(m.group(1)) <= len(p.ops):
            continue
        rules += 1
        wrong += m.group(3) != p.ops[int(m.group(1)) - 1]
    return rules, wrong


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def rl_row(p: Problem, index: int, split: str) -> dict:
    """One Open-AgentRL RL/eval row."""
    return make_rl_row(DATA_SOURCE, p, index, split)


def expert_messages(p: Problem, attempts: Sequence[Attempt], outputs: Sequence[str],
                    only_redo: bool = False) -> list[dict]:
    """The conversation of ``attempts`` with the sandbox's tool texts ``outputs``, then the answer.
    ``only_redo``: the redo turn is the only training target (every other assistant turn has weight
    0, context)."""
    msgs: list[dict] = [{"role": "user", "content": p.text()}]
    for att, out in zip(attempts, outputs):
        msg = {"role": "assistant", "content": att.think(), "tool_calls": [tool_call(att.code())]}
        # A deliberate error is context to recover from, not a target; in a redo-only row so is every
        # turn but the redo.
        if not (att.redo if only_redo else att.passes()):
            msg["weight"] = 0
        msgs.append(msg)
        msgs.append({"role": "tool", "content": out})
    msgs.append({"role": "assistant", "content": f"<think>\ndone\n</think>\n\n\\boxed{{{p.answer}}}"})
    if only_redo:
        msgs[-1]["weight"] = 0
    return msgs


async def run_attempts(plans: Sequence[tuple[Problem, Sequence[Attempt]]], sandbox: Any, max_output_chars: int = 256,
                       concurrency: int = 16, bar: Any = None) -> list[list[str]]:
    """Every attempt's code run in the sandbox (each distinct code once); the tool texts per plan.
    Raises when the sandbox disagrees with the arithmetic (a value that is not the step's, or a
    failing attempt without ``AssertionError``)."""
    sem = asyncio.Semaphore(concurrency)
    cache: dict[str, asyncio.Task] = {}

    async def run_code(code: str) -> str:
        async with sem:
            resp = await sandbox.run(run_request(prepare_code(code)))
        return tool_text(resp, max_output_chars)

    def output(code: str) -> asyncio.Task:
        if code not in cache:
            cache[code] = asyncio.ensure_future(run_code(code))
        return cache[code]

    async def one(p: Problem, attempts: Sequence[Attempt]) -> list[str]:
        outs = []
        for att in attempts:
            text = await output(att.code())
            want_ok = att.passes()
            if (want_ok and text.strip() != str(p.values[att.k])) or (not want_ok and FAILED_CHECK not in text):
                raise RuntimeError(f"sandbox gave {text!r} for {att.code()!r} (step {att.k + 1} of {p.text()!r})")
            outs.append(text)
        if bar is not None:
            bar.update(1)
        return outs

    return list(await asyncio.gather(*[one(p, a) for p, a in plans]))


def sft_rows(problems: Sequence[Problem], recover_fractions: dict[str, float], seed: int, sandbox_factory: Any = None,
             progress: bool = True, only_redo: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Expert SFT rows per named set (``messages`` with ``tool_calls``, ``tools``, ``extra_info.kind``):
    in set ``name`` a ``recover_fractions[name]`` share of the problems (drawn by ``seed``) has one
    miscopied step and its redo, the rest are clean; in the sets named in ``only_redo`` the redo turn
    is the only target. Every tool text is the local sandbox's real output; a code shared by several
    sets runs once."""
    if sandbox_factory is None:
        from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

        def sandbox_factory():
            return LocalSandbox(LocalSandboxConfig(workers=4))

    sets = {}
    for set_name, fraction in sorted(recover_fractions.items()):
        rng = random.Random(f"{seed}/{set_name}")
        kinds = ["recover" if rng.random() < fraction else "clean" for _ in problems]
        sets[set_name] = [(p, plan_attempts(p, rng, kind == "recover"), kind) for p, kind in zip(problems, kinds)]
    plans = [(p, a) for rows in sets.values() for p, a, _ in rows]

    async def run() -> list[list[str]]:
        sandbox = sandbox_factory()
        try:
            with tqdm(total=len(plans), desc="expert trajectories", unit="trajectory", disable=not progress) as bar:
                return await run_attempts(plans, sandbox, bar=bar)
        finally:
            await sandbox.close()

    outputs = iter(asyncio.run(run()))
    return {set_name: [{"messages": expert_messages(p, a, next(outputs), set_name in only_redo),
                        "tools": [CODE_INTERPRETER_TOOL], "extra_info": {"kind": kind}} for p, a, kind in rows]
            for set_name, rows in sets.items()}


def write_dataset(out_dir: Any, n_train: int = 4000, n_heldout: int = 512, n_sft: int = 4000, seed: int = 0,
                  n_eval: int = 64, recover_fraction: float = 0.5, sandbox_factory: Any = None,
                  progress: bool = True) -> dict[str, Any]:
    """Under ``out_dir``: ``train.parquet``, ``heldout.parquet`` and ``heldout_eval.parquet`` (its first
    ``n_eval`` rows; RL rows), ``sft_clean.parquet`` (the teacher's expert rows: every step right the
    first time) and ``sft_recover.parquet`` (the student's: ``recover_fraction`` of them with one
    miscopied step, its real traceback and the redo) and ``sft_redo.parquet`` (the student's second
    stage: every row has a miscopied step and its redo, and the redo turn is the only target), all
    over the first ``n_sft`` train problems."""
    from pathlib import Path

    out_dir = Path(out_dir)
    train, heldout = make_splits(n_train, n_heldout, seed)
    paths = write_rl_splits(out_dir, train, heldout, n_eval, rl_row)
    if n_sft:
        rows = sft_rows(train[:n_sft], {"clean": 0.0, "recover": recover_fraction, "redo": 1.0}, seed, sandbox_factory,
                        progress, only_redo=("redo",))
        for set_name, r in rows.items():
            paths[f"sft_{set_name}"] = write_parquet(r, out_dir / f"sft_{set_name}.parquet")
    return paths
