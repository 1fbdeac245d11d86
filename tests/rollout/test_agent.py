"""The TIR agent loop with a scripted policy (a double at the generation boundary) and real
sandboxes, and once end to end with the real engine."""

import asyncio
import socket

import pytest
from support.policies import ScriptedPolicy, turn

from sod_jax.chat import CODE_INTERPRETER_TOOL
from sod_jax.evaluation.evaluate import source_summary
from sod_jax.rl.rollouts import StepRollouts, rollout_metrics
from sod_jax.rollout.agent import Agent, AgentConfig, AgentRequest, EnginePolicy, tool_error_rate
from sod_jax.rollout.engine import EngineError
from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig
from sod_jax.sandbox.fusion import FusionSandbox

TOOLS = [CODE_INTERPRETER_TOOL]
QUESTION = [{"role": "user", "content": "Sum 1..10, then square it."}]


@pytest.fixture(scope="module")
def sandbox():
    return LocalSandbox(LocalSandboxConfig(workers=4))


def run_agent(tok, sandbox, scripts, n=1, **cfg):
    cfg.setdefault("on_parse_error", "observe")  # these tests read the observe-mode texts
    cfg.setdefault("failure_text", "descriptive")
    agent = Agent(tok, sandbox, AgentConfig(**cfg))
    policy = ScriptedPolicy(tok, scripts)
    trajs = asyncio.run(agent.run(policy, [AgentRequest(QUESTION, n=n, id="q")]))
    return trajs, policy


def test_three_turns_two_calls_equal_the_full_render(tok, sandbox):
    t1 = turn("Use python.", "Let me compute.", "print(sum(range(11)))")
    t2 = turn("Now square it.", "", "55 ** 2")  # the last expression is printed
    t3 = "<think>\nDone.\n</think>\n\nThe answer is \\boxed{3025}."
    (traj,), _ = run_agent(tok, sandbox, [[t1, t2, t3]])
    assert traj.finish_reason == "stop" and traj.num_turns == 3 and traj.num_tool_calls == 2
    assert traj.num_tool_errors == 0
    messages = QUESTION + [
        {"role": "assistant", "content": "<think>\nUse python.\n</think>\n\nLet me compute.",
         "tool_calls": [{"type": "function", "function": {"name": "code_interpreter",
                                                          "arguments": {"code": "print(sum(range(11)))"}}}]},
        {"role": "tool", "content": "55\n"},
        {"role": "assistant", "content": "<think>\nNow square it.\n</think>\n\n",
         "tool_calls": [{"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "55 ** 2"}}}]},
        {"role": "tool", "content": "3025\n"},
        {"role": "assistant", "content": t3},
    ]
    full = tok.render(messages, TOOLS)
    assert full.endswith("<|im_end|>\n")
    expected = tok.encode(full[:-1])  # the agent stops at <|im_end|>
    assert traj.prompt_ids + traj.response_ids == expected
    assert traj.prompt_ids == tok.encode_chat(QUESTION, TOOLS)
    # mask: exactly the assistant turns are 1
    lens = [len(tok.encode(t)) + 1 for t in (t1, t2, t3)]
    spans = traj.turn_spans
    assert [e - s for s, e in spans] == lens
    ones = [i for i, m in enumerate(traj.response_mask) if m]
    assert ones == [i for s, e in spans for i in range(s, e)]
    for (s, e), (s2, _) in zip(spans, spans[1:]):
        tool_ids = traj.response_ids[e:s2]
        assert tok.decode(tool_ids).startswith("\n<|im_start|>user\n<tool_response>\n")
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.response_mask) if not m)
    assert "\\boxed{3025}" in traj.text


def test_budget_exhaustion_mid_turn(tok, sandbox):
    t1 = turn("Compute.", "Running.", "print(1)")
    t2 = "<think>\n" + "very long reasoning " * 60 + "\n</think>\n\nDone."
    (traj,), policy = run_agent(tok, sandbox, [[t1, t2]], max_response_tokens=120)
    assert traj.finish_reason == "length" and len(traj.response_ids) == 120
    assert traj.turn_spans[-1][1] == 120 and traj.num_turns == 2
    # a tool response that would not fit ends the trajectory before it is appended
    (traj,), policy = run_agent(tok, sandbox, [[turn("x", "y", "print('z' * 200)"), "never"]],
                                max_response_tokens=len(tok.encode(t1)) + 8)
    assert traj.finish_reason == "length" and traj.num_turns == 1 and policy.appended[0] == []


def test_turn_cap(tok, sandbox):
    script = [turn(f"step {i}", "", f"print({i})") for i in range(20)]
    (traj,), _ = run_agent(tok, sandbox, [script])
    assert traj.num_turns == 16 and traj.finish_reason == "max_turns" and traj.num_tool_calls == 15


@pytest.mark.parametrize("raw,problem", [
    ('{"name": "code_interpreter", "arguments": {"code": "1"', "invalid_json"),
    ('{"arguments": {"code": "1"}}', "missing_name"),
    ('{"name": "code_interpreter"}', "missing_arguments"),
    ('{"name": "bash", "arguments": {"code": "ls"}}', "unknown tool 'bash'"),
    ('{"name": "code_interpreter", "arguments": {"src": "1"}}', "no \"code\""),
])
def test_malformed_calls_observe_and_end(tok, sandbox, raw, problem):
    bad = turn("try", "Calling.", raw_calls=[raw])
    final = "<think>\nok\n</think>\n\nDone."
    (traj,), policy = run_agent(tok, sandbox, [[bad, final]])
    assert traj.finish_reason == "stop" and traj.num_turns == 2 and traj.num_tool_errors == 1
    assert traj.num_invalid_calls == 1 and traj.num_tool_calls == 0
    observed = tok.decode(policy.appended[0][0])
    assert problem in observed and "Error" in observed
    (traj,), _ = run_agent(tok, sandbox, [[bad, final]], on_parse_error="end")
    if problem in ("unknown tool 'bash'", "no \"code\""):  # well-formed JSON: reported, not an episode end
        assert traj.finish_reason == "stop"
    else:
        assert traj.finish_reason == "parse_error" and traj.num_turns == 1


def test_parallel_calls_beyond_the_limit_are_reported(tok, sandbox):
    t1 = turn("two", "Both.", "print('first')", "print('second')")
    (traj,), policy = run_agent(tok, sandbox, [[t1, "<think>\n\n</think>\n\nok"]])
    observed = tok.decode(policy.appended[0][0])
    assert "first" in observed and "second" not in observed and "Not executed: at most 1" in observed
    assert traj.num_tool_calls == 1


def test_sandbox_timeout_is_an_observation(tok, sandbox):
    t1 = turn("loop", "Looping.", "while True:\n    pass")
    (traj,), policy = run_agent(tok, sandbox, [[t1, "<think>\n\n</think>\n\nok"]], run_timeout=1)
    assert "timed out" in tok.decode(policy.appended[0][0])
    assert traj.num_tool_errors == 1 and traj.finish_reason == "stop"
    assert traj.num_tool_calls == 1 and traj.num_invalid_calls == 0  # a failed run is a call that ran


def test_tool_error_rate_counts_every_written_call_once(tok, sandbox):
    """A failed run, a malformed call and a clean run: 2 errors over 3 calls written, in the RL step's
    figures and in the evaluation's alike."""
    t1 = turn("fail", "Failing.", "raise ValueError('x')")
    t2 = turn("bad", "Again.", raw_calls=['{"name": "code_interpreter"}'])
    t3 = turn("ok", "Now.", "print(1)")
    (traj,), _ = run_agent(tok, sandbox, [[t1, t2, t3, "<think>\n\n</think>\n\nok"]])
    assert (traj.num_tool_calls, traj.num_invalid_calls, traj.num_tool_errors) == (2, 1, 2)
    assert tool_error_rate(2, 2, 1) == pytest.approx(2 / 3) and tool_error_rate(0, 0, 0) == 0.0
    ro = StepRollouts([traj], [{}], [0], [{"score": 0.0}], [0.0], 1.0, 0.0)
    assert rollout_metrics(ro)["tool_error_rate"] == pytest.approx(2 / 3)
    rec = {"prompt_id": 0, "acc": False, "pred": "", "score": 0.0, "reward": 0.0, "turns": traj.num_turns,
           "tool_calls": traj.num_tool_calls, "tool_errors": traj.num_tool_errors,
           "tool_invalid_calls": traj.num_invalid_calls, "finish_reason": traj.finish_reason,
           "response_tokens": len(traj.response_ids), "model_tokens": sum(traj.response_mask)}
    assert source_summary({0: [rec]}, [1])["tool_error_rate"] == pytest.approx(2 / 3)


def test_sandbox_server_down_is_an_observation(tok):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = FusionSandbox(f"http://127.0.0.1:{port}", retries=1, backoff=0.01)
    t1 = turn("run", "Running.", "print(1)")
    (traj,), policy = run_agent(tok, down, [[t1, "<think>\n\n</think>\n\nok"]])
    assert "Tool execution failed" in tok.decode(policy.appended[0][0])
    assert traj.finish_reason == "stop" and traj.num_tool_errors == 1


def test_real_engine_end_to_end(tok, sandbox, tmp_path):
    """Plumbing with a tiny random model: masks, spans and log-probs line up with what was sampled."""
    import jax.numpy as jnp
    import numpy as np
    from conftest import make_hf_model
    from flax import nnx

    from sod_jax.models import load_pretrained
    from sod_jax.rl.update import sequence_logprobs
    from sod_jax.rollout import Engine, SamplingParams

    make_hf_model(seed=5, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    engine = Engine(model, num_slots=4, max_len=512, decode_steps=8, stop_ids=tok.stop_ids)
    agent = Agent(tok, sandbox, AgentConfig(max_response_tokens=48))
    trajs = asyncio.run(agent.run(EnginePolicy(engine, SamplingParams(temperature=1.0)),
                                  [AgentRequest(QUESTION, n=3, seed=1, id="a"), AgentRequest(QUESTION, n=2, id="b")]))
    assert [t.request_id for t in trajs] == ["a"] * 3 + ["b"] * 2
    graph, params = nnx.split(model)
    for t in trajs:
        assert t.finish_reason in ("stop", "length") and 1 <= len(t.response_ids) <= 48
        assert len(t.response_mask) == len(t.response_ids) == len(t.logprobs)
        seq = t.prompt_ids + t.response_ids
        ids = jnp.asarray([seq])
        lp, _ = sequence_logprobs(graph, params, ids, jnp.arange(len(seq))[None], jnp.ones_like(ids), 64)
        got = np.asarray(lp)[0, len(t.prompt_ids):]
        m = np.asarray(t.response_mask, bool)
        np.testing.assert_allclose(got[m], np.asarray(t.logprobs)[m], atol=1e-4)


def test_engine_policy_tool_turn_round_trip(tok, tmp_path):
    """Generate a turn, append tool tokens through EnginePolicy (cache extension), generate again:
    every sampled token's log-prob equals the training path on the whole sequence."""
    import jax.numpy as jnp
    import numpy as np
    from conftest import make_hf_model
    from flax import nnx

    from sod_jax.models import load_pretrained
    from sod_jax.rl.update import sequence_logprobs
    from sod_jax.rollout import Engine, SamplingParams

    make_hf_model(seed=6, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    policy = EnginePolicy(Engine(model, num_slots=2, max_len=512, decode_steps=4, stop_ids=[]),
                          SamplingParams(temperature=0.9))
    prompt = tok.encode_chat(QUESTION, TOOLS)
    (h,) = policy.start(prompt, 1, 3, 10)
    seq, mask, lps = list(prompt), [0] * len(prompt), [0.0] * len(prompt)

    def drain():
        while True:
            ev = asyncio.run(policy.advance())
            toks, lp, reason = ev.get(h, ([], [], None))
            seq.extend(toks)
            mask.extend([1] * len(toks))
            lps.extend(lp)
            if reason is not None:
                return reason

    assert drain() == "length" and sum(mask) == 10
    tool_ids = tok.tool_response_ids(["55\n"], TOOLS)
    policy.append(h, tool_ids, 7)
    seq.extend(tool_ids)
    mask.extend([0] * len(tool_ids))
    lps.extend([0.0] * len(tool_ids))
    assert drain() == "length" and sum(mask) == 17
    graph, params = nnx.split(model)
    ids = jnp.asarray([seq])
    lp, _ = sequence_logprobs(graph, params, ids, jnp.arange(len(seq))[None], jnp.ones_like(ids), 64)
    m = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(lp)[0][m], np.asarray(lps)[m], atol=1e-4)


def test_other_trajectories_decode_while_a_tool_runs(tok, sandbox):
    """A's tool call sleeps; B's three tool turns and answer all happen meanwhile."""
    slow = [turn("wait", "Sleeping.", "import time\ntime.sleep(2)\nprint('slept')"), "<think>\n\n</think>\n\nA done"]
    fast = [turn(f"b{i}", "", f"print({i})") for i in range(3)] + ["<think>\n\n</think>\n\nB done"]
    agent = Agent(tok, sandbox, AgentConfig())
    policy = ScriptedPolicy(tok, [slow, fast])
    order = []
    release = policy.release
    policy.release = lambda h: (order.append(h), release(h))
    trajs = asyncio.run(agent.run(policy, [AgentRequest(QUESTION, n=2, id="ab")]))
    assert order == [1, 0]  # B (handle 1) finished first although it made four turns
    assert [t.num_turns for t in trajs] == [2, 4] and "slept" in tok.decode(policy.appended[0][0])


def test_agent_config_from_the_config_tree():
    from sod_jax.config import load_config

    cfg = load_config(overrides=["algo.name=grpo", "tool.on_parse_error=end", "rollout.max_assistant_turns=4",
                                 "sandbox.run_timeout=3"])
    a = AgentConfig.from_config(cfg)
    assert (a.on_parse_error, a.max_assistant_turns, a.run_timeout, a.max_response_tokens, a.max_output_chars) == (
        "end", 4, 3.0, 20480, 256)


class SlowSandbox:
    """A scripted sandbox: code ``sleep:<seconds>:<text>`` answers ``text`` after that long."""

    def __init__(self):
        self.returned = []

    async def run(self, request):
        _, secs, text = request["code"].split(":", 2)
        await asyncio.sleep(float(secs))
        self.returned.append(text)
        return {"status": "Success", "run_result": {"status": "Finished", "return_code": 0, "stdout": text + "\n",
                                                    "stderr": "", "execution_time": float(secs)}}


class BatchedPolicy(ScriptedPolicy):
    """ScriptedPolicy with the batched protocol; records every extend batch and fails on request."""

    def __init__(self, tok, scripts, fail=(), on_extend=None):
        super().__init__(tok, scripts)
        self.batches, self.fail, self.on_extend = [], set(fail), on_extend

    def start_many(self, items):
        return [self.start(*it) for it in items]

    def extend(self, items):
        self.batches.append([h for h, _, _ in items])
        if self.on_extend:
            self.on_extend(items)
        errors = {}
        for h, ids, budget in items:
            if h in self.fail:
                errors[h] = EngineError(f"extending slot {h} overflows its cache")
            else:
                self.append(h, ids, budget)
        return errors


def test_early_tool_result_resumes_before_a_slow_one_and_engine_errors_end_one_trajectory(tok):
    """Handle 0's call sleeps 1.5 s; handle 1's returns at once and its next turn is generated (and
    its second call run) before handle 0's call returns. Handle 2's extension fails: only it ends."""
    sandbox = SlowSandbox()
    code = lambda s, t: turn("t", "", f"sleep:{s}:{t}")  # noqa: E731
    scripts = [[code(1.5, "slow"), "<think>\n\n</think>\n\nA"],
               [code(0, "fast1"), code(0, "fast2"), "<think>\n\n</think>\n\nB"],
               [code(0, "doomed"), "never"]]
    seen = []
    policy = BatchedPolicy(tok, scripts, fail={2}, on_extend=lambda items: seen.append(list(sandbox.returned)))
    agent = Agent(tok, sandbox, AgentConfig(extract_code_block=False, print_last_expression=False))
    trajs = asyncio.run(agent.run(policy, [AgentRequest(QUESTION, n=3, id="r")]))
    assert [t.finish_reason for t in trajs] == ["stop", "stop", "engine_error"]
    assert [t.num_turns for t in trajs] == [2, 3, 1]
    assert sandbox.returned.index("fast2") < sandbox.returned.index("slow")  # B's 2nd call ran meanwhile
    assert 0 not in policy.batches[0] and 1 in policy.batches[0]  # B's result went in without waiting
    assert all("slow" not in s for s, b in zip(seen, policy.batches) if 0 not in b)


def test_two_concurrent_runs_on_one_agent(tok, sandbox):
    agent = Agent(tok, sandbox, AgentConfig(max_concurrent_tools=1))

    async def both():
        a = ScriptedPolicy(tok, [[turn("a", "", "print(1)"), "<think>\n\n</think>\n\nA"]])
        b = ScriptedPolicy(tok, [[turn("b", "", "print(2)"), turn("b", "", "print(3)"), "<think>\n\n</think>\n\nB"]])
        return await asyncio.gather(agent.run(a, [AgentRequest(QUESTION, id="a")]),
                                    agent.run(b, [AgentRequest(QUESTION, id="b")]))

    (ta,), (tb,) = asyncio.run(both())
    assert (ta.request_id, ta.num_turns, ta.finish_reason) == ("a", 2, "stop")
    assert (tb.request_id, tb.num_turns, tb.finish_reason) == ("b", 3, "stop")
    assert "1" in tok.decode(ta.response_ids) and "3" in tok.decode(tb.response_ids)


def test_engine_policy_extends_some_slots_while_others_wait(tok, tmp_path):
    """Real engine: after a first turn on two slots, only slot A gets its tool response; A decodes
    while B keeps waiting, and A's tokens' log-probs equal the training path."""
    import jax.numpy as jnp
    import numpy as np
    from conftest import make_hf_model
    from flax import nnx

    from sod_jax.models import load_pretrained
    from sod_jax.rl.update import sequence_logprobs
    from sod_jax.rollout import Engine, SamplingParams

    make_hf_model(seed=7, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    policy = EnginePolicy(Engine(model, num_slots=2, max_len=512, decode_steps=4, stop_ids=[]),
                          SamplingParams(temperature=1.0))
    prompt = tok.encode_chat(QUESTION, TOOLS)
    (ha, hb), = policy.start_many([(prompt, 2, 4, 6)])
    seqs = {ha: list(prompt), hb: list(prompt)}
    lps = {ha: [], hb: []}
    ended = set()
    while len(ended) < 2:
        for h, (toks, lp, reason) in asyncio.run(policy.advance()).items():
            seqs[h] += toks
            lps[h] += lp
            if reason:
                ended.add(h)
    tool = tok.tool_response_ids(["42\n"], TOOLS)
    assert policy.extend([(ha, tool, 5)]) == {}
    n_gen_a = len(lps[ha])
    seqs[ha] += tool
    got = {ha: [], hb: []}
    while policy.busy():
        for h, (toks, lp, reason) in asyncio.run(policy.advance()).items():
            got[h] += toks
            lps[h] += lp
    assert len(got[ha]) == 5 and got[hb] == []  # B waited, A went on
    seq = seqs[ha] + got[ha]
    graph, params = nnx.split(model)
    ids = jnp.asarray([seq])
    lp, _ = sequence_logprobs(graph, params, ids, jnp.arange(len(seq))[None], jnp.ones_like(ids), 64)
    lp = np.asarray(lp)[0]
    P, T = len(prompt), len(tool)
    want = np.concatenate([lp[P:P + n_gen_a], lp[P + n_gen_a + T:]])
    np.testing.assert_allclose(want, lps[ha], atol=1e-4)
    err = policy.extend([(hb, list(range(600)), 5)])  # does not fit: an error for B only
    assert "overflows" in str(err[hb])
