"""The multi-turn tool-integrated (TIR) agent loop, token in, token out.

Each trajectory: the chat-template prompt (with the ``code_interpreter`` schema) -> an assistant
turn generated to ``<|im_end|>`` or the budget -> its tool calls parsed; none: the trajectory ends;
otherwise the code runs in the sandbox (asynchronously: other trajectories keep decoding), the
``tool`` message is rendered and its ids appended to the trajectory (and to the slot's KV cache),
and the next turn is generated. Ids are never re-tokenized: the response is exactly the sampled
tokens plus the template's tool-response tokens.

The loop talks to generation through :class:`TurnPolicy`, implemented over the slot engine by
:class:`EnginePolicy` (tests use scripted doubles).

Output per trajectory (:class:`Trajectory`): prompt ids, response ids, ``response_mask`` (1 = the
model's tokens, 0 = tool tokens), turn spans, sampler log-probs, counts and the finish reason
(``stop``: a final answer; ``length``: response budget; ``max_turns``; ``parse_error`` with
``on_parse_error: end`` when a turn opened tool calls and none of them was valid).

Parse errors (``on_parse_error``): ``end`` is the reference's behaviour: the turn's valid calls run
(up to ``max_parallel_calls``; the rest and all malformed ones are dropped without a message), an
unknown tool name is answered ``Error when executing tool: 'name'``, and the episode ends only when
no call of the turn is valid. ``observe`` answers every malformed or surplus call with an error
observation so the model can recover.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import jax

from sod_jax.chat import (
    REFERENCE_PARAMETER_DESCRIPTION,
    REFERENCE_TOOL_DESCRIPTION,
    ChatTokenizer,
    code_interpreter_tool,
    parse_tool_calls,
    parse_tool_calls_reference,
)
from sod_jax.rollout.engine import (
    Engine,
    EngineError,  # noqa: E402 - kept apart from the imports above
)
from sod_jax.rollout.sampling import SamplingParams
from sod_jax.rollout.scheduler import SlotScheduler, StartItem
from sod_jax.rollout.tools import call_problem, prepare_code, reference_call, tool_text
from sod_jax.sandbox.protocol import Sandbox, run_request


@dataclass
class AgentConfig:
    """Limits and tool handling (defaults reproduce the paper)."""

    max_assistant_turns: int = 16
    max_response_tokens: int = 20480  # assistant + tool tokens
    max_parallel_calls: int = 1
    on_parse_error: str = "end"  # end (the reference) | observe
    tool_name: str = "code_interpreter"
    extract_code_block: bool = True
    print_last_expression: bool = True
    max_output_chars: int = 256
    truncate_head: Optional[int] = None  # None: max_output_chars // 2
    truncate_tail: Optional[int] = None
    failure_text: str = "reference"  # reference | descriptive
    tool_description: str = REFERENCE_TOOL_DESCRIPTION
    parameter_description: str = REFERENCE_PARAMETER_DESCRIPTION
    run_timeout: float = 60.0
    memory_limit_mb: int = 2048
    enable_thinking: bool = True
    max_concurrent_tools: int = 64

    @classmethod
    def from_config(cls, cfg: Any) -> "AgentConfig":
        t, r, s = cfg.tool, cfg.rollout, cfg.sandbox
        return cls(max_assistant_turns=r.max_assistant_turns, max_response_tokens=r.max_response_length,
                   max_parallel_calls=t.max_parallel_calls, on_parse_error=t.on_parse_error, tool_name=t.name,
                   extract_code_block=t.extract_code_block, print_last_expression=t.print_last_expression,
                   max_output_chars=t.max_output_chars, run_timeout=s.run_timeout, memory_limit_mb=s.memory_limit_mb,
                   enable_thinking=r.enable_thinking, max_concurrent_tools=s.max_concurrency,
                   truncate_head=t.truncate_head, truncate_tail=t.truncate_tail, failure_text=t.failure_text,
                   tool_description=t.description, parameter_description=t.parameter_description)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)  # 1 model token, 0 tool token
    logprobs: list[float] = field(default_factory=list)  # sampler log-prob (0 on tool tokens)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn
    num_turns: int = 0
    num_tool_calls: int = 0  # calls run in the sandbox
    num_tool_errors: int = 0  # failed or timed-out runs, plus every call in num_invalid_calls
    num_invalid_calls: int = 0  # calls written but not run: malformed, wrong name or arguments, dropped
    finish_reason: str = ""
    text: str = ""
    request_id: Any = None
    sample_index: int = 0

    def invalid_calls(self, n: int = 1) -> None:
        """Count ``n`` calls that could not run (each is also a tool error)."""
        self.num_invalid_calls += n
        self.num_tool_errors += n


def tool_error_rate(errors: float, calls: float, invalid: float) -> float:
    """Tool errors per call the model wrote: ``errors`` (failed runs plus calls that could not run)
    over ``calls`` run plus ``invalid`` calls that could not run; in [0, 1], 0 when there were none."""
    return float(errors / max(calls + invalid, 1))


@dataclass
class AgentRequest:
    messages: list[dict]
    n: int = 1
    seed: int = 0
    id: Any = None


class TurnPolicy(Protocol):
    """Generation as the agent needs it. Handles are opaque; at most ``capacity`` live at once.

    Optional batched forms (used when present): ``start_many([(prompt_ids, n, seed, budget), ...])``
    returning per item a list of handles or an :class:`EngineError`, and ``extend([(handle, token_ids,
    budget), ...])`` returning ``{handle: EngineError}`` for the items it could not serve."""

    capacity: int

    def start(self, prompt_ids: list[int], n: int, seed: int, budget: int) -> list[Any]: ...

    async def advance(self) -> dict[Any, tuple[list[int], list[float], Optional[str]]]:
        """New tokens per handle since the last call; the third item is None while the turn goes on,
        else why it ended: ``stop`` (a stop token, included in the tokens) or ``length``."""

    def append(self, handle: Any, token_ids: list[int], budget: int) -> None: ...

    def release(self, handle: Any) -> None: ...

    def busy(self) -> bool:
        """Whether any handle is generating (advance would make progress)."""


class EnginePolicy:
    """:class:`TurnPolicy` over the slot engine, through the shared
    :class:`~sod_jax.rollout.scheduler.SlotScheduler`: prompts admitted together share prefill calls,
    tool responses that arrived together share extension calls, and each :meth:`advance` dispatches
    the next decode call before reading the previous one back."""

    def __init__(self, engine: Engine, sampling: SamplingParams):
        self.engine, self.sampling = engine, sampling
        self.sched = SlotScheduler(engine)
        self.capacity = engine.num_slots
        self._stop = engine.stop_set

    def start_many(self, items: Sequence[tuple[list[int], int, int, int]]) -> list:
        """``[(prompt_ids, n, seed, budget), ...]`` -> per item its handles, or the EngineError that
        keeps it from starting (the other items start)."""
        out, starts = [], []
        for prompt_ids, n, seed, budget in items:
            err = self.engine.check_prompt(len(prompt_ids))
            if err is None and n > self.sched.num_free:
                err = EngineError(f"n={n} samples but {self.sched.num_free} free decode slots")
            if err is None and budget < 1:
                err = EngineError(f"token budget {budget} < 1")
            if err is not None:
                out.append(err)
                continue
            slots = self.sched.acquire(n)
            starts.append(StartItem(prompt_ids, slots, self.sampling, seed,
                                    min(budget, self.engine.max_len - len(prompt_ids))))
            out.append(slots)
        if starts:
            self.sched.start(starts)
        return out

    def start(self, prompt_ids, n, seed, budget):
        (res,) = self.start_many([(prompt_ids, n, seed, budget)])
        if isinstance(res, EngineError):
            raise res
        return res

    def extend(self, items: Sequence[tuple[int, list[int], int]]) -> dict[int, EngineError]:
        """``[(handle, token_ids, budget), ...]``: all in one device call per tool-text bucket."""
        return self.sched.extend(items)

    def append(self, handle, token_ids, budget):
        errors = self.extend([(handle, token_ids, budget)])
        if errors:
            raise errors[handle]

    def release(self, handle):
        self.sched.release(handle)

    def busy(self) -> bool:
        return self.sched.busy()

    async def advance(self):
        entries = self.sched.dispatch()
        fetched = await asyncio.get_running_loop().run_in_executor(None, jax.device_get, [e.out for e in entries])
        out = {}
        for s, (toks, lps, ended) in self.sched.harvest(entries, fetched).items():
            reason = None
            if ended:
                reason = "stop" if toks and toks[-1] in self._stop else "length"
            out[s] = (toks, lps, reason)
        return out


class _Live:
    """Book-keeping of one trajectory in flight."""

    def __init__(self, traj: Trajectory, handle: Any, key: tuple[int, int]):
        self.traj, self.handle, self.key = traj, handle, key
        self.turn_start = 0


# The running :meth:`Agent.run`'s bound on concurrent sandbox calls. A context variable, not an
# attribute: every run (and the tool tasks it spawns) sees its own, so concurrent runs are safe.
_TOOL_SEM: contextvars.ContextVar[asyncio.Semaphore] = contextvars.ContextVar("sod_jax_agent_tool_sem")


class Agent:
    """Runs TIR trajectories through a :class:`TurnPolicy` and a :class:`Sandbox`."""

    def __init__(self, tokenizer: ChatTokenizer, sandbox: Sandbox, config: Optional[AgentConfig] = None):
        self.tok, self.sandbox = tokenizer, sandbox
        self.cfg = config or AgentConfig()
        self.tools = [code_interpreter_tool(name=self.cfg.tool_name, description=self.cfg.tool_description,
                                            parameter_description=self.cfg.parameter_description)]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tok.encode_chat(messages, self.tools, add_generation_prompt=True,
                                    enable_thinking=self.cfg.enable_thinking)

    # -- one finished turn ------------------------------------------------------------------------

    async def _run_call(self, code: str) -> dict:
        async with _TOOL_SEM.get():
            return await self.sandbox.run(run_request(code, run_timeout=self.cfg.run_timeout,
                                                      memory_limit_mb=self.cfg.memory_limit_mb))

    async def _observations(self, live: _Live, text: str) -> Optional[list[str]]:
        """Tool messages for the turn's calls, or None when the trajectory ends here."""
        cfg, traj = self.cfg, live.traj
        turn = parse_tool_calls(text)
        if not turn.has_calls:
            traj.finish_reason = "stop"
            return None
        if traj.num_turns >= cfg.max_assistant_turns:  # the last allowed turn's calls are not run
            traj.finish_reason = "max_turns"
            return None
        if cfg.on_parse_error == "end":
            return await self._reference_observations(traj, text, turn)
        runnable, notes = [], []
        for call in turn.calls:
            problem = call_problem(call.name, call.arguments, cfg.tool_name)
            if problem:
                traj.invalid_calls()
                notes.append(f"Error: {problem}.")
            elif len(runnable) < cfg.max_parallel_calls:
                runnable.append(call)
            else:
                notes.append(f"Not executed: at most {cfg.max_parallel_calls} tool call(s) run per turn.")
        for err in turn.errors:
            traj.invalid_calls()
            notes.append(f"Error: malformed tool call ({err.kind}): {err.message}. Write "
                         f"<tool_call>{{\"name\": \"{cfg.tool_name}\", \"arguments\": {{\"code\": \"...\"}}}}</tool_call>.")
        codes = [prepare_code(c.arguments["code"], cfg.extract_code_block, cfg.print_last_expression) for c in runnable]
        results = await asyncio.gather(*[self._run_call(c) for c in codes])
        traj.num_tool_calls += len(runnable)
        outputs = []
        for r in results:
            if r.get("status") != "Success":
                traj.num_tool_errors += 1
            outputs.append(self._tool_text(r))
        return outputs + notes

    def _tool_text(self, response: dict) -> str:
        cfg = self.cfg
        return tool_text(response, cfg.max_output_chars, cfg.failure_text, cfg.truncate_head, cfg.truncate_tail)

    async def _reference_observations(self, traj: Trajectory, text: str, turn) -> Optional[list[str]]:
        """``on_parse_error: end``: the reference's handling of a turn that opened tool calls."""
        cfg = self.cfg
        calls = parse_tool_calls_reference(text)
        traj.invalid_calls(len(turn.calls) + len(turn.errors) - len(calls))  # dropped blocks
        if not calls:
            traj.finish_reason = "parse_error"
            return None
        slots: list = []  # per call: code to run, or the error text the model reads
        for call in calls[: cfg.max_parallel_calls]:
            code, error = reference_call(call.name, call.arguments, cfg.tool_name)
            if error is not None:
                traj.invalid_calls()
            slots.append(error if code is None else
                         self._run_call(prepare_code(code, cfg.extract_code_block, cfg.print_last_expression)))
        results = await asyncio.gather(*[s for s in slots if not isinstance(s, str)])
        traj.num_tool_calls += len(results)
        it = iter(results)
        outputs = []
        for s in slots:
            if isinstance(s, str):
                outputs.append(s)
                continue
            r = next(it)
            if r.get("status") != "Success":
                traj.num_tool_errors += 1
            outputs.append(self._tool_text(r))
        return outputs

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, policy: TurnPolicy, requests: Sequence[AgentRequest]) -> list[Trajectory]:
        """All trajectories of all requests (``n`` each), in request order. Keeps no state on the
        agent: concurrent runs (on different policies) are safe. An :class:`EngineError` for one
        trajectory (a prompt or tool response that does not fit its slot) ends only that trajectory,
        with ``finish_reason="engine_error"``."""
        cfg = self.cfg
        _TOOL_SEM.set(asyncio.Semaphore(cfg.max_concurrent_tools))  # this task's context only
        queue = list(range(len(requests)))
        prompts = {i: self.prompt_ids(r.messages) for i, r in enumerate(requests)}
        for i, r in enumerate(requests):
            if r.n > policy.capacity:
                raise ValueError(f"request {r.id!r} asks n={r.n} but the policy holds {policy.capacity} at once")
        live: dict[Any, _Live] = {}
        done: dict[tuple[int, int], Trajectory] = {}
        tools: dict[asyncio.Task, _Live] = {}
        used = 0
        start_many = getattr(policy, "start_many", None)
        extend = getattr(policy, "extend", None)

        def finish(lv: _Live) -> None:
            nonlocal used
            t = lv.traj
            t.text = self.tok.decode(t.response_ids)
            done[lv.key] = t
            live.pop(lv.handle, None)
            policy.release(lv.handle)
            used -= 1

        def start_failed(ri: int) -> None:
            r = requests[ri]
            for i in range(r.n):
                done[(ri, i)] = Trajectory(list(prompts[ri]), request_id=r.id, sample_index=i,
                                           finish_reason="engine_error")

        def start(batch: list[int]) -> None:
            nonlocal used
            items = [(prompts[ri], requests[ri].n, requests[ri].seed, cfg.max_response_tokens) for ri in batch]
            if start_many is not None:
                results = start_many(items)
            else:
                results = []
                for it in items:
                    try:
                        results.append(policy.start(*it))
                    except EngineError as e:
                        results.append(e)
            for ri, handles in zip(batch, results):
                if isinstance(handles, EngineError):
                    start_failed(ri)
                    continue
                r = requests[ri]
                used += r.n
                for i, h in enumerate(handles):
                    live[h] = _Live(Trajectory(list(prompts[ri]), request_id=r.id, sample_index=i), h, (ri, i))

        def append(batch: list[tuple[_Live, list[int], int]]) -> None:
            items = [(lv.handle, ids, room) for lv, ids, room in batch]
            if extend is not None:
                errors = extend(items)
            else:
                errors = {}
                for h, ids, room in items:
                    try:
                        policy.append(h, ids, room)
                    except EngineError as e:
                        errors[h] = e
            for lv, _, _ in batch:
                if lv.handle in errors:
                    lv.traj.finish_reason = "engine_error"
                    finish(lv)

        while queue or live:
            batch, want = [], used
            while queue and want + requests[queue[0]].n <= policy.capacity:
                want += requests[queue[0]].n
                batch.append(queue.pop(0))
            if batch:
                start(batch)
                continue  # admit what the freed capacity allows (failed starts use none)
            if policy.busy():
                events = await policy.advance()
            else:
                events = {}
                if tools:
                    await asyncio.wait(list(tools), return_when=asyncio.FIRST_COMPLETED)
            for h, (toks, lps, reason) in events.items():
                lv = live[h]
                t = lv.traj
                t.response_ids += toks
                t.response_mask += [1] * len(toks)
                t.logprobs += lps
                if reason is None:
                    continue
                t.turn_spans.append((lv.turn_start, len(t.response_ids)))
                t.num_turns += 1
                if reason == "length":
                    t.finish_reason = "length"
                    finish(lv)
                    continue
                text = self.tok.decode(t.response_ids[lv.turn_start:])
                tools[asyncio.ensure_future(self._observations(lv, text))] = lv
            arrived = []  # every tool result that is in: extended together in one engine call per bucket
            for task in [tk for tk in tools if tk.done()]:
                lv = tools.pop(task)
                t = lv.traj
                contents = task.result()
                if contents is None:
                    finish(lv)
                    continue
                ids = self.tok.tool_response_ids(contents, self.tools, enable_thinking=cfg.enable_thinking)
                room = cfg.max_response_tokens - len(t.response_ids) - len(ids)
                if room < 1:
                    t.finish_reason = "length"
                    finish(lv)
                    continue
                t.response_ids += ids
                t.response_mask += [0] * len(ids)
                t.logprobs += [0.0] * len(ids)
                lv.turn_start = len(t.response_ids)
                arrived.append((lv, ids, room))
            if arrived:
                append(arrived)
        return [done[(ri, i)] for ri in range(len(requests)) for i in range(requests[ri].n)]
