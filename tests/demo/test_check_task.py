"""The demo_check task: problems and their text, attempts (clean, miscopied, redo), real sandbox
tracebacks for failed checks, and reading a trajectory back (outcomes per turn, recovery)."""

import asyncio
import json
import random

import pytest

from sod_jax.demo.check_task import (
    DATA_SOURCE,
    MAX_VALUE,
    MOD,
    OPS,
    Attempt,
    correct_attempt,
    error_attempt,
    error_recovery,
    expert_messages,
    failed_steps,
    make_splits,
    miscopy,
    parse_problem,
    plan_attempts,
    restated_op_slips,
    rl_row,
    run_attempts,
    sample_problem,
    turn_outcomes,
)
from sod_jax.demo.task import score


def test_problems_and_their_text():
    rng = random.Random(3)
    for _ in range(300):
        p = sample_problem(rng)
        assert 2 <= p.num_steps <= 3
        x = p.a
        for op, c, v in zip(p.ops, p.operands, p.values):  # recompute the chain independently
            x = eval(f"{x}{op}{c}")
            assert x == v and 0 <= v <= MAX_VALUE
        assert parse_problem(p.text()) == p
    assert set(OPS) == {"+"}  # the generator writes one op; the parser reads all three
    p = parse_problem("a = 347\nx1 = a*28 [check 16]\nx2 = x1+915 [check 58]\nFind x2.")
    assert p.values == (9716, 10631) and (p.check(0), p.check(1)) == (16, 58) and p.operands == (28, 915)
    # every step's operand is on the step's own line: the prompt has no separate constant for it
    assert p.text().splitlines()[:2] == ["a = 347", "x1 = a*28 [check 16]"]
    assert parse_problem("a = 347\nx1 = a*28 [check 17]\nFind x1.") is None  # a wrong check is not this task
    assert parse_problem("a = 347\nb = 28\nx1 = a*b [check 16]\nFind x1.") is None  # the earlier layout
    # the rules may come in any order (the generator shuffles them); each step exactly once
    q = parse_problem("a = 347\nx2 = x1+915 [check 58]\nx1 = a*28 [check 16]\nFind x2.")
    assert q.values == p.values and q.order == (1, 0) and q.text().splitlines()[1] == "x2 = x1+915 [check 58]"
    assert parse_problem("a = 347\nx1 = a*28 [check 16]\nx1 = a*28 [check 16]\nFind x2.") is None
    assert parse_problem("a = 347\nx2 = x1+915 [check 58]\nx1 = a*28 [check 16]\nFind x1.") is None
    orders = {sample_problem(random.Random(i), 3, 3).order for i in range(60)}
    assert len(orders) == 6  # every order of three rules occurs
    assert parse_problem("x1 = 592+271\nx2 = x1+517\nFind x2.") is None  # the old chain task
    a_train, a_held = make_splits(200, 40, seed=5)
    assert not {q.text() for q in a_train} & {q.text() for q in a_held}
    assert [q.text() for q in make_splits(200, 40, seed=5)[0]] == [q.text() for q in a_train]
    row = rl_row(a_train[0], 0, "train")
    assert row["data_source"] == DATA_SOURCE and row["reward_model"]["ground_truth"] == str(a_train[0].answer)


def test_attempts_clean_miscopied_and_redo():
    rng = random.Random(0)
    for _ in range(200):
        p = sample_problem(rng)
        for k in range(p.num_steps):
            good = correct_attempt(p, k)
            assert good.passes() and eval(f"{good.left}{good.op}{good.right}") == p.values[k]
            bad = error_attempt(p, k, rng)
            assert not bad.passes()
            diffs = [(f, getattr(good, f), getattr(bad, f)) for f in ("left", "right", "check")
                     if getattr(good, f) != getattr(bad, f)]
            (field, was, now), = diffs  # exactly one field, one digit
            assert len(was) == len(now) and sum(x != y for x, y in zip(was, now)) == 1
        plan = plan_attempts(p, rng, recover=True)
        assert len(plan) == p.num_steps + 1
        i = next(i for i, a in enumerate(plan) if not a.passes())
        assert plan[i + 1] == correct_attempt(p, plan[i].k, redo=True)
        assert all(a.passes() for a in plan_attempts(p, rng, recover=False))
    assert all(miscopy("5", rng) != "5" for _ in range(20))
    assert all(not miscopy("12", rng).startswith("0") for _ in range(50))
    a = Attempt(1, "9716", "915", "58", "+", redo=True)
    assert a.think() == ("<think>\ncheck failed, redo\nx2 = x1+915 [check 58]\nx1 = 9716\nx2 = 9716+915, check 58"
                         "\n</think>\n\n")
    first = Attempt(0, "347", "28", "16", "*", redo=True)  # step 1 re-reads its line and a from the prompt
    assert first.think() == ("<think>\ncheck failed, redo\nx1 = a*28 [check 16]\na = 347\nx1 = 347*28, "
                             "check 16\n</think>\n\n")
    p = sample_problem(random.Random(3))  # the redo's re-read rule is the prompt's own line for that step
    for k in range(p.num_steps):
        rule = p.text().splitlines()[1 + p.order.index(k)]
        assert correct_attempt(p, k, redo=True).think().splitlines()[2] == rule
        assert rule not in correct_attempt(p, k).think() + correct_attempt(p, k).code()
    # a first attempt writes the step with the left operand's value alone, never the rule's form
    assert Attempt(1, "9716", "915", "58", "+").think() == "<think>\nx2 = 9716+915, check 58\n</think>\n\n"
    assert a.code() == f"x2 = 9716+915\nassert x2 % {MOD} == 58\nprint(x2)"


def test_restated_op_slips_count_rule_lines_with_another_op():
    prompt = "a = 347\nx2 = x1+915 [check 58]\nx1 = a*28 [check 16]\nFind x2."
    p = parse_problem(prompt)
    plan = [correct_attempt(p, 0), error_attempt(p, 1, random.Random(0)), correct_attempt(p, 1, redo=True)]
    expert = "".join(a.think() + a.code() + "\n" for a in plan)
    assert restated_op_slips(prompt, expert) == (1, 0)  # the redo re-reads its rule; first attempts do not
    # a wrong op in a restated rule counts even when the code's op (and so the check) is right
    slipped = expert.replace("x2 = x1+915 [check 58]", "x2 = x1-915 [check 58]", 1)
    assert slipped != expert and restated_op_slips(prompt, slipped) == (1, 1)
    assert restated_op_slips(prompt, "x3 = x2+1 [check 1]\nx1 = 347*28, check 16") == (0, 0)  # no step 3; not a rule
    assert restated_op_slips("x1 = 592+271\nx2 = x1+517\nFind x2.", expert) is None  # another task's prompt


def test_failed_checks_are_real_sandbox_tracebacks_and_read_back():
    from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

    rng = random.Random(11)
    problems = make_splits(4, 1, seed=11)[0]
    plans = [(p, plan_attempts(p, rng, recover=True)) for p in problems]

    async def run():
        sb = LocalSandbox(LocalSandboxConfig(workers=2))
        try:
            return await run_attempts(plans, sb)
        finally:
            await sb.close()

    outs = asyncio.run(run())
    for (p, attempts), o in zip(plans, outs):
        for att, text in zip(attempts, o):
            if att.passes():
                assert text == f"{p.values[att.k]}\n"  # what print() wrote, as the agent shows it
            else:
                assert text.startswith("Traceback (most recent call last):") and "AssertionError" in text
        msgs = expert_messages(p, attempts, o)
        assert score(msgs[-1]["content"], p.answer)["acc"]
        weights = [m.get("weight", 1) for m in msgs if m["role"] == "assistant" and m.get("tool_calls")]
        assert weights == [int(a.passes()) for a in attempts]  # the miscopied turn is context only
        calls = [json.loads(m["tool_calls"][0]["function"]["arguments"])["code"] for m in msgs if m.get("tool_calls")]
        assert calls == [a.code() for a in attempts]
        outcomes = turn_outcomes(p, [*o, None])
        bad = next(i for i, a in enumerate(attempts) if not a.passes())
        # the failed step's rule, as the prompt writes it: nowhere in the failed attempt (think, code,
        # real traceback), so a redo that re-reads it can only copy the prompt; the redo holds it
        rule = p.text().splitlines()[1 + p.order.index(attempts[bad].k)]
        failed_text = json.dumps(msgs[1 + 2 * bad]) + o[bad]
        assert rule.split(" [")[0] not in failed_text and rule in msgs[3 + 2 * bad]["content"]
        assert outcomes[bad] == (attempts[bad].k, "failed_check") and outcomes[bad + 1] == (attempts[bad].k, "ok")
        assert outcomes[-1] == (None, "answer")
        assert failed_steps(p, [*o, None]) == [i == bad for i in range(len(o) + 1)]
        assert error_recovery(p.text(), [*o, None]) is True
        assert error_recovery(p.text(), [*o[:bad + 1], None]) is False  # gave up after the failed check
        clean = [f"{v}\n" for v in p.values]
        assert error_recovery(p.text(), [*clean, None]) is None


@pytest.mark.parametrize("outputs,expected", [
    (["16\n", None], [(0, "ok"), (None, "answer")]),
    (["Traceback\nAssertionError\n", "16\n", None], [(0, "failed_check"), (0, "ok"), (None, "answer")]),
    (["17\n", "16\n", "x\n"], [(0, "wrong"), (0, "ok"), (None, "extra")]),
    ([None], [(0, "answer")]),
])
def test_turn_outcomes(outputs, expected):
    p = sample_problem(random.Random(1), 1, 1)
    outputs = [o if o is None or o.startswith(("T", "x")) else
               ("%d\n" % (p.values[0] + (1 if o == "17\n" else 0))) for o in outputs]
    assert turn_outcomes(p, outputs) == expected


def test_write_dataset_splits_and_the_sft_sets(tmp_path):
    import pyarrow.parquet as pq

    from sod_jax.data import load_rows
    from sod_jax.demo.check_task import write_dataset

    paths = write_dataset(tmp_path, n_train=40, n_heldout=12, n_sft=10, n_eval=4, recover_fraction=0.5,
                          progress=False)
    train = pq.read_table(paths["train"]).to_pylist()
    held = pq.read_table(paths["heldout"]).to_pylist()
    assert len(train) == 40 and len(held) == 12 and len(pq.read_table(paths["heldout_eval"]).to_pylist()) == 4
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held}
    clean, _ = load_rows([paths["sft_clean"]], "sft")
    recover, _ = load_rows([paths["sft_recover"]], "sft")
    assert len(clean) == len(recover) == 10
    assert all("AssertionError" not in json.dumps(r["messages"]) for r in clean)  # the teacher never sees a failure
    kinds = [r["extra_info"]["kind"] for r in pq.read_table(paths["sft_recover"]).to_pylist()]
    n_bad = sum("AssertionError" in json.dumps(r["messages"]) for r in recover)
    assert n_bad == kinds.count("recover") > 0
    for r, row in zip(recover, train):
        assert r["messages"][0]["content"] == row["prompt"][0]["content"]
        assert score(r["messages"][-1]["content"], row["reward_model"]["ground_truth"])["acc"]
    # The student's second stage: every row fails a check, and the redo after it is the only target.
    redo, _ = load_rows([paths["sft_redo"]], "sft")
    assert len(redo) == 10
    for r, row in zip(redo, train):
        msgs = r["messages"]
        assert msgs[0]["content"] == row["prompt"][0]["content"]
        assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        trained = [i for i in assistant if msgs[i].get("weight", 1) == 1]
        assert len(trained) == 1, msgs
        k = trained[0]
        assert msgs[k]["content"].startswith("<think>\ncheck failed, redo\n")
        assert "AssertionError" in msgs[k - 1]["content"]  # the tool turn just before it is the failed check
