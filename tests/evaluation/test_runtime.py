"""The one eval set-up (sod_jax.evaluation.runtime): the eval CLI, the SFT accuracy hook and the RL
loop's eval all build it through ``build_eval_runtime``; it borrows the parts it is given and closes
only what it built; its engine is sized from the one longest-prompt scan; its rows load and fail as
the callers expect."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import pytest
from support.eval_fixtures import eval_rows
from support.policies import ScriptedPolicy

from sod_jax import eval as eval_cli
from sod_jax.chat import code_interpreter_tool
from sod_jax.config import EvalConfig, load_config
from sod_jax.evaluation import runtime
from sod_jax.evaluation.evaluate import EvalError, evaluate
from sod_jax.rewards import RewardPool
from sod_jax.rl.trainer import Trainer
from sod_jax.rollout.agent import AgentConfig
from sod_jax.sft.accuracy_hook import AccuracyHook

FIGURES = {"AIME2024": {"acc": 0.5, "tool_calls_mean": 1.0, "tool_error_rate": 0.0, "turns_mean": 2.0}}


class FakeRuntime:
    """What the callers see of an EvalRuntime; records what they do with it."""

    def __init__(self, rows):
        self.rows, self.stats = rows, {"rows": len(rows), "too_long": 0, "by_source": {"AIME2024": len(rows)}}
        self.engine = SimpleNamespace(params=None, update_params=lambda p: setattr(self.engine, "params", p))
        self.runs, self.closed = [], 0

    def run(self, step=None, out_dir=None, progress=False):
        self.runs.append((step, out_dir, progress))
        return json.loads(json.dumps(FIGURES))

    def close(self):
        self.closed += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeSandbox:
    def __init__(self):
        self.closed = 0

    async def run(self, request):
        return {"status": "Success", "run_result": {"status": "Finished", "return_code": 0, "stdout": "42\n",
                                                    "stderr": ""}}

    async def close(self):
        self.closed += 1


class FakePool:
    def __init__(self, reward_cfg, sandbox=None):
        self.sandbox, self.closed = sandbox, 0

    def close(self):
        self.closed += 1


class FakeRunDir:
    def __init__(self):
        self.evals = []

    def log_eval(self, step, summary):
        self.evals.append((step, dict(summary)))


ROWS = [{"data_source": "AIME2024", "prompt": [{"role": "user", "content": f"Question {w}: what is 6 times 7?"}],
         "ground_truth": gt, "extra_info": {}, "index": i}
        for i, (w, gt) in enumerate([("alpha", "42"), ("beta", "41")])]


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in eval_rows()))
    return path


@pytest.fixture
def recorded(monkeypatch):
    """build_eval_runtime replaced: every call is recorded (caller's keywords) and gets a FakeRuntime."""
    calls = []

    def fake_build(cfg, tok, **kw):
        rows = kw.get("rows")
        if rows is None:
            rows = [dict(r, index=i) for i, r in enumerate(ROWS)]
            if kw.get("limit"):
                rows = rows[: kw["limit"]]
        rt = FakeRuntime(rows)
        calls.append((cfg, tok, kw, rt))
        return rt

    monkeypatch.setattr(runtime, "build_eval_runtime", fake_build)
    return calls


def test_eval_cli_sft_hook_and_rl_eval_all_build_through_the_runtime(recorded, tmp_path, tokenizer_dir, tok,
                                                                     eval_file):
    # 1) python -m sod_jax.eval
    out = tmp_path / "eval_out"
    cfg = load_config(overrides=[f"model.path={tokenizer_dir}", f"eval.files=[{eval_file}]", f"eval.out_dir={out}",
                                 "eval.n=2", "eval.ks=[1,2]", "eval.seed=7"], job="eval")
    figures, out_dir = eval_cli.run(cfg, progress=False)
    assert len(recorded) == 1
    _, _, kw, rt = recorded[0]
    assert kw["files"] == [str(eval_file)] and kw["seed"] == 7 and "engine" not in kw  # built from model.path
    assert figures == FIGURES and out_dir == out
    assert rt.runs == [(None, str(out), False)] and rt.closed == 1
    assert json.loads((out / "data_stats.json").read_text()) == rt.stats and (out / "config.yaml").is_file()

    # 2) the SFT accuracy hook: a real EvalConfig of one answer per prompt at the accuracy budget
    cfg = load_config(overrides=[f"sft.accuracy_files=[{eval_file}]", "sft.accuracy_prompts=1", "sft.seed=3",
                                 "sft.accuracy_temperature=0", "sft.accuracy_max_response_length=99"], job="sft")
    hook = AccuracyHook(cfg, tok)
    trainer = SimpleNamespace(model=lambda: "the model", step=0, out_dir=tmp_path / "sft", is_writer=True,
                              state=SimpleNamespace(params="the params"))
    hook.on_start(trainer)
    assert len(recorded) == 2
    _, _, kw, rt = recorded[1]
    assert kw["files"] == [str(eval_file)] and kw["limit"] == 1 and kw["model"] == "the model" and kw["seed"] == 3
    ev = kw["eval_cfg"]
    assert isinstance(ev, EvalConfig)
    assert (ev.n, ev.ks, ev.temperature, ev.top_p, ev.max_response_length, ev.chunk_prompts) == (1, [1], 0.0, 1.0,
                                                                                                  99, 0)
    assert dataclasses.replace(ev, n=cfg.eval.n, ks=cfg.eval.ks, temperature=cfg.eval.temperature,
                               top_p=cfg.eval.top_p, max_response_length=cfg.eval.max_response_length,
                               chunk_prompts=cfg.eval.chunk_prompts) == cfg.eval  # the rest as in cfg.eval
    rec = hook.measure(trainer, 5)
    assert rt.engine.params == "the params" and rt.runs == [(5, None, False)]
    assert (rec["acc"], rec["tool_calls"], rec["turns"], rec["prompts"]) == (0.5, 1.0, 2.0, 1)
    hook.close()
    hook.close()
    assert rt.closed == 1

    # 3) the RL loop's eval: built once, over the live engine, sandbox, loop and reward pool
    cfg = load_config(overrides=["algo.name=grpo", "train.seed=11"], job="train")
    t = Trainer(cfg, progress=False)
    try:
        live = dict(engine=object(), sandbox=object(), rewards=object())
        t.__dict__.update(live, tok=tok, val_rows=[dict(r) for r in ROWS], val_stats={"rows": 2},
                          tools=runtime.tool_schemas(cfg), is_main=True, needs_teacher=False, run_dir=FakeRunDir())
        first = t.evaluate(0)
        second = t.evaluate(0)
        assert len(recorded) == 3  # one build for both evals
        _, _, kw, rt = recorded[2]
        assert all(kw[k] is v for k, v in live.items()) and kw["loop"] is t.loop
        assert kw["rows"] is t.val_rows and kw["tools"] == t.tools and kw["seed"] == 11
        assert rt.runs == [(0, None, False), (0, None, False)] and rt.closed == 0
        for s in (first, second):
            assert s["AIME2024"] == FIGURES["AIME2024"] and s["seconds"] >= 0 and "heldout_kl" not in s
        assert [step for step, _ in t.run_dir.evals] == [0, 0]
    finally:
        t.loop.close()


def test_tool_schemas_is_the_configs_code_interpreter():
    cfg = load_config(overrides=["tool.name=python"], job="eval")
    assert runtime.tool_schemas(cfg) == [code_interpreter_tool(cfg.tool)]
    assert runtime.tool_schemas(cfg)[0]["function"]["name"] == "python"


def test_runtime_borrows_given_parts_and_matches_evaluate(tok):
    cfg = load_config(overrides=["eval.n=2", "eval.ks=[1,2]", "eval.max_response_length=256", "eval.seed=4"],
                      job="eval")
    script = lambda text, j: ["<think>\nok\n</think>\n\n\\boxed{42}"]  # noqa: E731
    loop, sandbox = asyncio.new_event_loop(), FakeSandbox()
    try:
        with RewardPool(cfg.reward) as pool:
            rt = runtime.build_eval_runtime(cfg, tok, rows=ROWS, engine=ScriptedPolicy(tok, script, capacity=4),
                                            sandbox=sandbox, loop=loop, rewards=pool)
            assert rt.owned == frozenset() and rt.seed == 4 and rt.tools == runtime.tool_schemas(cfg)
            assert rt.agent_cfg == AgentConfig.from_config(cfg)
            got = rt.run(step=2)
            rt.close()
            assert sandbox.closed == 0 and not loop.is_closed()  # borrowed parts stay open
            want = evaluate(ScriptedPolicy(tok, script, capacity=4), tok, sandbox, ROWS, eval_cfg=cfg.eval,
                            agent_cfg=AgentConfig.from_config(cfg), reward_pool=pool, step=2, seed=4,
                            progress=False, loop=loop, tools=runtime.tool_schemas(cfg))
    finally:
        loop.close()
    assert got == want
    assert got["AIME2024"]["acc"] == pytest.approx(0.5) and got["AIME2024"]["n"] == 2


def test_runtime_closes_exactly_what_it_built(monkeypatch, tok):
    made = []
    monkeypatch.setattr(runtime, "make_sandbox", lambda sandbox_cfg: made.append(FakeSandbox()) or made[-1])
    monkeypatch.setattr(runtime, "RewardPool", FakePool)
    cfg = load_config(job="eval")
    with runtime.build_eval_runtime(cfg, tok, rows=ROWS, engine="engine") as rt:
        assert rt.owned == {"sandbox", "loop", "rewards"} and rt.sandbox is made[0] and rt.rewards.sandbox is made[0]
    assert made[0].closed == 1 and rt.rewards.closed == 1 and rt.loop.is_closed()
    rt.close()  # idempotent
    assert made[0].closed == 1 and rt.rewards.closed == 1

    # a borrowed loop: the owned sandbox closes on it, the loop stays open
    loop = asyncio.new_event_loop()
    try:
        rt = runtime.build_eval_runtime(cfg, tok, rows=ROWS, engine="engine", loop=loop)
        assert rt.owned == {"sandbox", "rewards"}
        rt.close()
        assert made[1].closed == 1 and not loop.is_closed()
    finally:
        loop.close()

    # a part that fails to build: what was built before it is closed, the error goes up
    def broken_pool(reward_cfg, sandbox=None):
        raise RuntimeError("no reward workers")

    monkeypatch.setattr(runtime, "RewardPool", broken_pool)
    with pytest.raises(RuntimeError, match="no reward workers"):
        runtime.build_eval_runtime(cfg, tok, rows=ROWS, engine="engine")
    assert made[2].closed == 1


def test_engine_sized_by_the_longest_prompt(monkeypatch, tok):
    seen = []

    class RecordingEngine:
        def __init__(self, model, **kw):
            seen.append((model, kw))

    monkeypatch.setattr(runtime, "Engine", RecordingEngine)
    tools = [code_interpreter_tool(None)]
    longest = max(len(tok.encode_chat(r["prompt"], tools, True, True)) for r in ROWS)  # the agent's encoding
    cases = [(4, 64, 8), (1, 1, 1), (1, 64, 2), (8, 4, 8), (3, 5, 5)]  # (eval.n, rollout.num_slots, slots)
    for n, num_slots, slots in cases:
        cfg = load_config(overrides=[f"rollout.num_slots={num_slots}", "rollout.enable_thinking=true"], job="eval")
        ev = dataclasses.replace(cfg.eval, n=n, max_response_length=100)
        runtime.eval_engine(cfg, "model", tok, ROWS, tools, ev)
        model, kw = seen[-1]
        assert model == "model" and kw["num_slots"] == slots and kw["max_len"] == longest + 101
        assert kw["stop_ids"] == tok.stop_ids and kw["tokenizer"] is tok


def test_rows_from_files_and_the_error_when_none_is_left(monkeypatch, tok, eval_file):
    cfg = load_config(job="eval")
    rows, stats = runtime.load_eval_rows(cfg, tok, [str(eval_file)])
    assert len(rows) == 4 and stats["rows"] == 4 and stats["by_source"] == {"AIME2024": 2, "LiveCodeBench_v6": 2}
    assert cfg.data.max_prompt_length == load_config(job="eval").data.max_prompt_length  # not changed in place
    rows2, _ = runtime.load_eval_rows(cfg, tok, [str(eval_file)], limit=3)
    assert rows2 == rows[:3]
    short, stats = runtime.load_eval_rows(cfg, tok, [str(eval_file)], max_prompt_length=5)
    assert short == [] and stats["too_long"] == 4

    # no row left: an error naming the files' key, before any model is loaded
    monkeypatch.setattr(runtime, "load_eval_model", lambda cfg: pytest.fail("model loaded for no rows"))
    cfg = load_config(overrides=["data.max_prompt_length=5"], job="eval")
    with pytest.raises(EvalError, match=r"sft\.accuracy_files .*no prompt left.*data\.max_prompt_length=5"):
        runtime.build_eval_runtime(cfg, tok, files=[str(eval_file)], files_key="sft.accuracy_files")


def test_eval_cli_kv_cache_that_cannot_fit_fails_before_weights_load(tmp_path, tokenizer_dir, eval_file, capsys):
    """The Qwen3-0.6B architecture (the real config.json) with no weight file at all: a KV budget too
    small for the engine is refused from the arithmetic, with exit code 2 and one line naming
    rollout.num_slots and the largest value that fits; no weight load is attempted."""
    import shutil
    from pathlib import Path

    reference = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3"
    model = tmp_path / "qwen3_0.6b_no_weights"
    model.mkdir()
    shutil.copy(reference / "config.Qwen3-0.6B.json", model / "config.json")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model / f.name)
    code = eval_cli.main(["--model", str(model), "--files", str(eval_file), "--no-progress",
                          "eval.n=4", "eval.ks=[1,4]", "eval.max_response_length=20000", "rollout.num_slots=64",
                          "rollout.kv_cache_budget_gb=10", f"eval.out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    line = [x for x in err if x.startswith("error:")]
    assert len(line) == 1 and "rollout.num_slots" in line[0] and "the largest rollout.num_slots that fits is" in line[0]
    assert "safetensors" not in "\n".join(err)
