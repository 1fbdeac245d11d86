"""evaluate() with a scripted policy (answers known, no model): the reported figures equal values
computed by hand; outputs, resume after an interruption, settings checks."""

from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import pytest
from support.policies import ScriptedPolicy

from sod_jax.config import load_config
from sod_jax.evaluation.evaluate import EvalError, evaluate, overlong_penalty, request_seed
from sod_jax.rewards import RewardPool
from sod_jax.rollout.agent import AgentConfig

N = 4


def answer(x: str) -> str:
    return f"<think>\nDone.\n</think>\n\nThe answer is \\boxed{{{x}}}."


def tool_turn(code: str) -> str:
    call = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    return f"<think>\nCheck with Python.\n</think>\n\n<tool_call>\n{call}\n</tool_call>"


# Per prompt (keyed by a word in its question), the n scripted samples (each a list of assistant turns).
SCRIPTS = {
    "alpha": [[tool_turn("print(6 * 7)"), answer("42")], [answer("41")], [tool_turn("fail"), answer("42")],
              ["<think>\nNo idea.\n</think>\n\nI do not know."]],
    "beta": [[answer("7")], [answer("8")], [answer("8")], [answer("8")]],
    "gamma": [[answer("B")], [answer("B")], [answer("A")], ["<think>\nHmm\n</think>\n\nC?"]],
}
ROWS = [
    {"data_source": "AIME2024", "prompt": [{"role": "user", "content": "Question alpha: 6 times 7?"}],
     "ground_truth": "42", "extra_info": {}, "index": 10},
    {"data_source": "AIME2024", "prompt": [{"role": "user", "content": "Question beta: 3 plus 4?"}],
     "ground_truth": "7", "extra_info": {}, "index": 11},
    {"data_source": "gpqa_diamond", "prompt": [{"role": "user", "content": "Question gamma: pick B."}],
     "ground_truth": "B", "extra_info": {}, "index": 12},
]


class FakeSandbox:
    """Runs nothing: ``fail`` fails, anything else prints 42."""

    async def run(self, request):
        if "fail" in request["code"]:  # (the agent may wrap the last expression in print)
            return {"status": "Failed", "run_result": {"status": "Finished", "return_code": 1, "stdout": "",
                                                       "stderr": "NameError: name 'fail' is not defined"}}
        return {"status": "Success", "run_result": {"status": "Finished", "return_code": 0, "stdout": "42\n",
                                                    "stderr": ""}}

    async def close(self):
        pass


def word(text: str) -> str:
    return next(w for w in SCRIPTS if f"Question {w}" in text)


def scripted(tok, capacity=8):
    """Sample j of the prompt mentioning word w emits SCRIPTS[w][j]."""
    return ScriptedPolicy(tok, lambda text, j: SCRIPTS[word(text)][j], capacity=capacity, logprob=-0.1, label=word)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(load_config(job="eval").reward) as p:
        yield p


def run_eval(tok, pool, out_dir=None, rows=ROWS, policy=None, **eval_over):
    over = [f"eval.n={N}", "eval.ks=[1,2,4]", "eval.max_response_length=2048"] + [f"eval.{k}={v}" for k, v in eval_over.items()]
    cfg = load_config(overrides=over, job="eval")
    policy = policy or scripted(tok)
    res = evaluate(policy, tok, FakeSandbox(), rows, eval_cfg=cfg.eval, agent_cfg=AgentConfig(), reward_pool=pool,
                   step=3, out_dir=out_dir, seed=5, progress=False)
    return res, policy


def pass_k(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_figures_equal_hand_computed_values(tok, pool, tmp_path):
    res, _ = run_eval(tok, pool, tmp_path)
    math, gpqa = res["AIME2024"], res["gpqa_diamond"]
    # AIME2024: alpha correct [T, F, T, F] (preds 42, 41, 42, ""), beta [T, F, F, F] (7, 8, 8, 8)
    assert math["prompts"] == 2 and math["n"] == N and math["samples"] == 8
    assert math["acc"] == pytest.approx((2 / 4 + 1 / 4) / 2) == math["avg@4"]
    assert math["avg@1"] == pytest.approx(1.0) and math["avg@2"] == pytest.approx(0.5)
    for k in (1, 2, 4):
        assert math[f"pass@{k}"] == pytest.approx(float((pass_k(4, 2, k) + pass_k(4, 1, k)) / 2))
    assert math["pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    # maj@4: alpha -> 42 (2 votes) right, beta -> 8 (3 votes) wrong; maj@2: ties go to the first answer
    assert math["maj@4"] == pytest.approx(0.5) and math["maj@2"] == pytest.approx(1.0) and math["maj@1"] == 1.0
    assert math["mean@4"] == pytest.approx(0.375)  # the reference's mean@n is avg@n
    # tools: alpha's samples 0 and 2 call once each (the second fails); turns 2, 1, 2, 1 and beta 1 x 4
    assert math["tool_calls_mean"] == pytest.approx(2 / 8) and math["tool_error_rate"] == pytest.approx(1 / 2)
    assert math["tool_errors_mean"] == pytest.approx(1 / 8) and math["turns_mean"] == pytest.approx(10 / 8)
    assert math["finish/stop"] == 1.0
    # scores: strict rule, +1 right / -1 wrong; no overlong penalty configured
    assert math["score_mean"] == pytest.approx((3 * 1 - 5 * 1) / 8) == math["reward_mean"]
    # GPQA: [B, B, A, ""] with B right
    assert gpqa["acc"] == pytest.approx(0.5) and gpqa["maj@4"] == 1.0 and gpqa["maj@2"] == 1.0
    assert gpqa["pass@2"] == pytest.approx(5 / 6) and gpqa["tool_calls_mean"] == 0.0

    recs = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and {r["prompt_id"] for r in recs} == {10, 11, 12}
    a = {r["sample"]: r for r in recs if r["prompt_id"] == 10}
    assert [a[j]["pred"] for j in range(4)] == ["42", "41", "42", ""]
    assert [a[j]["acc"] for j in range(4)] == [True, False, True, False]
    assert (a[0]["tool_calls"], a[2]["tool_errors"], a[0]["turns"]) == (1, 1, 2)
    assert "<tool_response>" in a[0]["response"] and "42" in a[0]["response"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3 and summary["per_source"]["AIME2024"]["acc"] == math["acc"]
    assert summary["all"]["prompts"] == 3 and summary["all"]["acc"] == pytest.approx((2 + 1 + 2) / 12)
    assert summary["verl"]["val-core/AIME2024/acc/mean@4"] == pytest.approx(0.375)
    assert "val-core/gpqa_diamond/acc/best@4/mean" in summary["verl"]
    md = (tmp_path / "summary.md").read_text()
    assert "| AIME2024 | 2 | 37.5 |" in md and "| gpqa_diamond | 1 | 50.0 |" in md and "pass@2" in md


def test_request_seeds_depend_on_prompt_not_order(tok, pool):
    _, p1 = run_eval(tok, pool)
    _, p2 = run_eval(tok, pool, rows=list(reversed(ROWS)))
    assert sorted(p1.started) == sorted(p2.started)
    assert dict(p1.started)["alpha"] == request_seed(5, 10)


def test_resume_regenerates_only_unfinished_prompts(tok, pool, tmp_path):
    full, _ = run_eval(tok, pool, tmp_path / "full", chunk_prompts=1)
    # an interrupted run: the first prompt finished, the second cut mid-line
    part = tmp_path / "part"
    run_eval(tok, pool, part, chunk_prompts=1)
    lines = (part / "generations.jsonl").read_text().splitlines()
    (part / "generations.jsonl").write_text("\n".join(lines[:N + 2]) + "\n" + lines[N + 2][:25])
    (part / "summary.json").unlink()
    resumed, policy = run_eval(tok, pool, part, chunk_prompts=1)
    assert [w for w, _ in policy.started] == ["beta", "gamma"]  # alpha was not regenerated
    assert resumed == full
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a == b
    assert len((part / "generations.jsonl").read_text().splitlines()) == 3 * N
    # nothing left to do: no generation at all
    again, policy = run_eval(tok, pool, part, chunk_prompts=1)
    assert policy.started == [] and again == full


def test_resume_refuses_other_settings_or_prompts(tok, pool, tmp_path):
    run_eval(tok, pool, tmp_path)
    with pytest.raises(EvalError, match=r"other settings \(temperature: 1.0 there vs 0.5 now"):
        run_eval(tok, pool, tmp_path, temperature=0.5)
    changed = [dict(ROWS[0], ground_truth="43")] + ROWS[1:]
    with pytest.raises(EvalError, match="prompt 10 was a different prompt"):
        run_eval(tok, pool, tmp_path, rows=changed)


def test_bad_settings_and_overlong_penalty(tok, pool):
    with pytest.raises(EvalError, match=r"eval.ks \[8\] are outside \[1, eval.n=4\]"):
        run_eval(tok, pool, ks="[8]")
    with pytest.raises(EvalError, match="raise rollout.num_slots"):
        run_eval(tok, pool, policy=scripted(tok, capacity=2))
    assert overlong_penalty(100, 200, 50, 1.0) == 0.0
    assert overlong_penalty(175, 200, 50, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(200, 200, 50, 2.0) == pytest.approx(-2.0)
    assert overlong_penalty(10_000, 200, 0, 1.0) == 0.0
