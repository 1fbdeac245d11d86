"""The agent's default (``on_parse_error: end``, ``failure_text: reference``) against the reference's
handling of a turn: valid calls run, malformed ones dropped silently, the episode ends only when no
call is valid, unknown names answered ``Error when executing tool: 'name'``."""

import asyncio

import pytest
from support.policies import ScriptedPolicy, turn

from sod_jax.chat import CODE_INTERPRETER_TOOL
from sod_jax.rollout.agent import Agent, AgentConfig, AgentRequest
from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

TOOLS = [CODE_INTERPRETER_TOOL]
QUESTION = [{"role": "user", "content": "Sum 1..10, then square it."}]

FINAL = "<think>\nok\n</think>\n\nDone."
MALFORMED = '{"name": "code_interpreter", "arguments": {"code": "print(2)"'  # unclosed JSON


@pytest.fixture(scope="module")
def sandbox():
    return LocalSandbox(LocalSandboxConfig(workers=2))


def run(tok, sandbox, script, **cfg):
    agent = Agent(tok, sandbox, AgentConfig(**cfg))
    assert agent.cfg.on_parse_error == "end" and agent.cfg.failure_text == "reference"  # the defaults
    policy = ScriptedPolicy(tok, [script])
    (traj,) = asyncio.run(agent.run(policy, [AgentRequest(QUESTION, n=1, id="q")]))
    return traj, policy


def tool_message_text(contents):
    """The template's tool turn for these tool messages, written out."""
    body = "".join(f"\n<tool_response>\n{c}\n</tool_response>" for c in contents)
    return f"\n<|im_start|>user{body}<|im_end|>\n<|im_start|>assistant\n"


def test_one_valid_and_one_malformed_call_runs_the_valid_one_only(tok, sandbox):
    t1 = turn("two calls", "Running.", "print(6 * 7)", raw_calls=[MALFORMED])
    traj, policy = run(tok, sandbox, [t1, FINAL])
    assert traj.finish_reason == "stop" and traj.num_turns == 2 and traj.num_tool_calls == 1
    assert traj.num_tool_errors == 1  # the dropped block is counted, not shown
    (appended,) = policy.appended[0]
    assert tok.decode(appended) == tool_message_text(["42\n"])  # one tool message, nothing about the bad call
    assert appended == tok.tool_response_ids(["42\n"], TOOLS)


def test_malformed_first_then_valid(tok, sandbox):
    t1 = turn("two calls", "Running.", raw_calls=[MALFORMED, '{"name": "code_interpreter", "arguments": {"code": "1+1"}}'])
    traj, policy = run(tok, sandbox, [t1, FINAL])
    assert tok.decode(policy.appended[0][0]) == tool_message_text(["2\n"]) and traj.finish_reason == "stop"


@pytest.mark.parametrize("raw", [MALFORMED, '{"arguments": {"code": "1"}}', '{"name": "code_interpreter"}', '["x"]'])
def test_no_valid_call_ends_the_episode(tok, sandbox, raw):
    traj, policy = run(tok, sandbox, [turn("bad", "Calling.", raw_calls=[raw]), FINAL])
    assert traj.finish_reason == "parse_error" and traj.num_turns == 1 and policy.appended[0] == []
    assert traj.num_tool_errors == 1


def test_unterminated_call_ends_the_episode(tok, sandbox):
    text = '<think>\nx\n</think>\n\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "1"}}'
    traj, _ = run(tok, sandbox, [text, FINAL])
    assert traj.finish_reason == "parse_error" and traj.num_turns == 1


def test_unknown_tool_and_bad_arguments_are_answered_like_the_reference(tok, sandbox):
    t1 = turn("calls", "", raw_calls=['{"name": "bash", "arguments": {"code": "ls"}}'])
    t2 = turn("again", "", raw_calls=['{"name": "code_interpreter", "arguments": "print(1)"}'])
    traj, policy = run(tok, sandbox, [t1, t2, FINAL])
    assert [tok.decode(a) for a in policy.appended[0]] == [
        tool_message_text(["Error when executing tool: 'bash'"]),
        tool_message_text(["Error when executing tool: 'str' object has no attribute 'get'"])]
    assert traj.finish_reason == "stop" and traj.num_tool_calls == 0 and traj.num_tool_errors == 2
    assert traj.num_invalid_calls == 2


def test_calls_beyond_the_limit_are_dropped_silently(tok, sandbox):
    traj, policy = run(tok, sandbox, [turn("two", "Both.", "print('first')", "print('second')"), FINAL])
    assert tok.decode(policy.appended[0][0]) == tool_message_text(["first\n"]) and traj.num_tool_calls == 1
    traj, policy = run(tok, sandbox, [turn("two", "Both.", "print('first')", "print('second')"), FINAL],
                       max_parallel_calls=2)
    assert tok.decode(policy.appended[0][0]) == tool_message_text(["first\n", "second\n"])


def test_a_run_that_does_not_finish_reads_no_stdout_here(tok, sandbox):
    t1 = turn("loop", "Looping.", "print('partial')\nwhile True:\n    pass")
    traj, policy = run(tok, sandbox, [t1, FINAL], run_timeout=1)
    assert tok.decode(policy.appended[0][0]) == tool_message_text(["no stdout here"])
    assert traj.num_tool_errors == 1


def test_long_output_is_truncated_by_the_references_rule(tok, sandbox):
    t1 = turn("long", "", "print('a' * 200 + 'b' * 200, end='')")
    _, policy = run(tok, sandbox, [t1, FINAL])
    assert tok.decode(policy.appended[0][0]) == tool_message_text(["a" * 128 + "...(truncated)..." + "b" * 128])
