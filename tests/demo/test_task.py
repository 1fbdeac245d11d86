"""The demo_chain task: seeded splits, the checker, RL/SFT row layouts, expert rows with real tool
outputs from the local sandbox."""

import asyncio
import random

import pyarrow.parquet as pq
import pytest

from sod_jax.demo import DATA_DIR
from sod_jax.demo.task import (
    DATA_SOURCE,
    MAX_VALUE,
    expert_messages,
    expert_outputs,
    last_boxed,
    make_splits,
    rl_row,
    sample_problem,
    score,
)


def test_problems_are_chains_of_small_constants():
    rng = random.Random(3)
    for _ in range(500):
        p = sample_problem(rng)
        assert 2 <= p.num_steps <= 3
        assert all(10 <= c <= 999 for c in (p.first,) + p.operands)
        x = p.first
        for op, c, v in zip(p.ops, p.operands, p.values):  # recompute the chain independently
            x = eval(f"{x}{op}{c}")
            assert x == v and 0 <= v <= MAX_VALUE


def test_splits_are_seeded_and_disjoint():
    a_train, a_held = make_splits(300, 50, seed=7)
    b_train, b_held = make_splits(300, 50, seed=7)
    assert [p.text() for p in a_train] == [p.text() for p in b_train]
    assert [p.text() for p in a_held] == [p.text() for p in b_held]
    assert not {p.text() for p in a_train} & {p.text() for p in a_held}
    assert len({p.text() for p in a_train}) == 300


@pytest.mark.parametrize("text,truth,acc", [
    ("<think>\ndone\n</think>\n\n\\boxed{1234}", "1234", True),
    ("\\boxed{12} then \\boxed{1234}", "1234", True),
    ("\\boxed{1234} then \\boxed{12}", "1234", False),  # the last box counts
    ("\\boxed{ 1234 }", 1234, True),
    ("1234", "1234", False),  # no box
    ("\\boxed{1234.0}", "1234", False),  # strict string match
])
def test_checker_is_strict_last_boxed(text, truth, acc):
    out = score(text, truth)
    assert out["acc"] is acc and out["score"] == float(acc)
    assert out["pred"] == (last_boxed(text) or "")


def test_rl_row_layout():
    p = make_splits(1, 1)[0][0]
    row = rl_row(p, 0, "train")
    assert row["data_source"] == DATA_SOURCE
    assert row["prompt"] == [{"role": "user", "content": p.text()}]
    assert row["reward_model"]["ground_truth"] == str(p.answer)
    assert row["extra_info"]["num_steps"] == p.num_steps


def test_expert_rows_use_real_sandbox_outputs():
    from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

    problems = make_splits(4, 1, seed=11)[0]

    async def run():
        sb = LocalSandbox(LocalSandboxConfig(workers=2))
        try:
            return await expert_outputs(problems, sb)
        finally:
            await sb.close()

    outs = asyncio.run(run())
    for p, o in zip(problems, outs):
        assert o == [f"{v}\n" for v in p.values]  # what print() wrote, as the agent shows it
        msgs = expert_messages(p, o)
        calls = [m for m in msgs if m.get("tool_calls")]
        assert len(calls) == p.num_steps
        # step k+1's code starts with step k's printed result: the copy the model must make
        for k in range(1, p.num_steps):
            code = calls[k]["tool_calls"][0]["function"]["arguments"]
            assert f'"code": "{o[k - 1].strip()}{p.ops[k]}{p.operands[k]}"' in code
        assert score(msgs[-1]["content"], p.answer)["acc"]


def test_shipped_splits():
    train = pq.read_table(DATA_DIR / "train.parquet").to_pylist()
    held = pq.read_table(DATA_DIR / "heldout.parquet").to_pylist()
    sft = pq.read_table(DATA_DIR / "sft_train.parquet").to_pylist()
    assert {r["data_source"] for r in train + held} == {DATA_SOURCE}
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held}
    assert len(sft) > 0 and sft[0]["tools"][0]["function"]["name"] == "code_interpreter"
    # every expert answer is right by the checker
    for r in sft[:200]:
        last = r["messages"][-1]
        user = r["messages"][0]["content"]
        match = [t for t in train if t["prompt"][0]["content"] == user]
        assert match and score(last["content"], match[0]["reward_model"]["ground_truth"])["acc"]


def test_parse_problem_inverts_text_and_flags_failed_steps():
    import random

    from sod_jax.demo.task import failed_steps, parse_problem, sample_problem

    rng = random.Random(7)
    for _ in range(200):
        p = sample_problem(rng)
        assert parse_problem(p.text()) == p
    assert parse_problem("What is 12 * 13?") is None
    assert parse_problem("x1 = x1+3\nFind x1.") is None  # the first step must start from a constant
    p = parse_problem("x1 = 592+271\nx2 = x1+517\nFind x2.")
    assert p.values == (863, 1380)
    assert failed_steps(p, ["863", "1380", None]) == [False, False, False]
    assert failed_steps(p, ["863\n", "1381", None]) == [False, True, False]
    assert failed_steps(p, [None, "1380"]) == [True, False]  # a turn without a tool call did not compute x1
