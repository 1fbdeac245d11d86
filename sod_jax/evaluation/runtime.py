"""The one eval set-up: what :func:`~sod_jax.evaluation.evaluate.evaluate` runs with.

``python -m sod_jax.eval``, the SFT accuracy hook (:mod:`sod_jax.sft.accuracy_hook`) and the RL
loop's periodic eval (:meth:`sod_jax.rl.trainer.Trainer.evaluate`) all get their tool schemas, eval
rows, engine, sandbox, event loop, reward pool and agent config from :func:`build_eval_runtime`:

* the RL loop hands over its live engine, sandbox, event loop and reward pool (shared with
  training): the runtime borrows them and never closes them;
* the eval CLI and the SFT hook let it build the rest: an :class:`~sod_jax.rollout.engine.Engine`
  over the given model (or the checkpoint at ``model.path``) sized for the rows
  (:func:`eval_engine`), a sandbox from :func:`~sod_jax.sandbox.factory.make_sandbox`, a fresh event
  loop and a :class:`~sod_jax.rewards.RewardPool`; :meth:`EvalRuntime.close` closes exactly these.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from sod_jax.chat import code_interpreter_tool
from sod_jax.data import load_prompt_rows, prompt_lengths
from sod_jax.evaluation.evaluate import EvalError, evaluate
from sod_jax.models import load_pretrained
from sod_jax.models.hf import read_config
from sod_jax.rewards import RewardPool
from sod_jax.rollout.agent import AgentConfig
from sod_jax.rollout.engine import Engine, engine_options
from sod_jax.rollout.sizes import kv_budget_problem
from sod_jax.sandbox.factory import make_sandbox


def tool_schemas(cfg: Any) -> list[dict]:
    """The tool schemas the model is shown (the ``tool`` section's code interpreter): prompt lengths
    are measured and prompts are rendered with exactly these."""
    return [code_interpreter_tool(cfg.tool)]


def load_eval_rows(cfg: Any, tok: Any, files: Sequence[str], *, tools: Optional[list[dict]] = None,
                   max_prompt_length: Optional[int] = None, limit: int = 0) -> tuple[list[dict], dict]:
    """Eval rows of ``files`` (:func:`~sod_jax.data.load_prompt_rows`, kind ``eval``: ``data.*``
    templates and checks, ``reward.sources``, the length filter with ``tools`` rendered) and their
    stats. ``max_prompt_length``: the length filter (default ``data.max_prompt_length``); ``limit``:
    keep only the first rows (0: all)."""
    data = cfg.data
    if max_prompt_length is not None and max_prompt_length != data.max_prompt_length:
        data = copy.copy(data)
        data.max_prompt_length = max_prompt_length
    rows, stats = load_prompt_rows(files, data, tok, kind="eval", reward_cfg=cfg.reward,
                                   tools=tool_schemas(cfg) if tools is None else tools,
                                   enable_thinking=cfg.rollout.enable_thinking)
    if limit:
        rows = rows[:limit]
    return rows, stats


def load_eval_model(cfg: Any) -> Any:
    """The checkpoint at ``model.path`` for sampling only (``model.*`` dtypes and layout, no remat)."""
    m = cfg.model
    return load_pretrained(m.path, dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                           remat="none", attention_block=m.attention_block)


def eval_engine_sizes(cfg: Any, tok: Any, rows: Sequence[dict], tools: list[dict], eval_cfg: Any) -> tuple[int, int]:
    """(slots, slot length) of the engine for evaluating ``rows``: ``eval.n`` samples of a prompt decode
    together, and up to ``rollout.num_slots`` samples in all (never more than there are); each
    sequence holds the longest prompt plus ``max_response_length`` tokens."""
    n = int(eval_cfg.n)
    longest = max(prompt_lengths(rows, tok, tools, cfg.rollout.enable_thinking))
    return max(n, min(cfg.rollout.num_slots, n * len(rows))), longest + int(eval_cfg.max_response_length) + 1


def check_eval_kv_cache(cfg: Any, slots: int, max_len: int) -> None:
    """The engine's KV-cache check from the model's config.json alone (before any weight loads):
    :class:`EvalError` with the one-line message when ``rollout.kv_cache_budget_gb`` is set and the
    cache does not fit it."""
    budget = float(cfg.rollout.kv_cache_budget_gb or 0)
    if not budget:
        return  # the engine checks the device's own memory once the model is loaded
    model_cfg = read_config(cfg.model.path)
    problem = kv_budget_problem(model_cfg, slots, max_len, cfg.model.dtype, int(budget * 2**30),
                                min_slots=int(cfg.eval.n))
    if problem:
        raise EvalError(problem)


def eval_engine(cfg: Any, model: Any, tok: Any, rows: Sequence[dict], tools: list[dict], eval_cfg: Any) -> Engine:
    """An engine for evaluating ``rows`` (sizes: :func:`eval_engine_sizes`)."""
    r = cfg.rollout
    slots, max_len = eval_engine_sizes(cfg, tok, rows, tools, eval_cfg)
    budget = float(r.kv_cache_budget_gb or 0)
    return Engine(model, num_slots=slots, max_len=max_len, decode_steps=r.decode_steps,
                  prefill_buckets=r.prefill_buckets, **engine_options(r), stop_ids=tok.stop_ids, tokenizer=tok,
                  kv_budget_bytes=int(budget * 2**30) if budget else None)


@dataclass
class EvalRuntime:
    """Everything one evaluation needs; :meth:`run` evaluates the engine's current weights.

    ``owned`` names the parts built for this runtime (of ``sandbox``, ``loop``, ``rewards``):
    :meth:`close` closes those and leaves borrowed ones alone."""

    tok: Any
    tools: list[dict]
    rows: list[dict]
    engine: Any
    sandbox: Any
    loop: asyncio.AbstractEventLoop
    rewards: Any
    agent_cfg: Any
    eval_cfg: Any
    seed: int = 0
    stats: dict = field(default_factory=dict)
    owned: frozenset = frozenset()

    def run(self, step: Optional[int] = None, out_dir: Optional[str] = None, progress: bool = False) -> dict:
        """``{data_source: figures}`` of :func:`~sod_jax.evaluation.evaluate.evaluate` on the rows
        (with ``out_dir``: generations and summary written there, resumable)."""
        return evaluate(self.engine, self.tok, self.sandbox, self.rows, eval_cfg=self.eval_cfg,
                        agent_cfg=self.agent_cfg, reward_pool=self.rewards, step=step,
                        out_dir=None if out_dir is None else str(out_dir), seed=self.seed, progress=progress,
                        loop=self.loop, tools=self.tools)

    def close(self) -> None:
        """Close the owned parts (reward pool, then sandbox on its loop, then the loop); idempotent."""
        owned, self.owned = self.owned, frozenset()
        _close(owned, self.rewards, self.sandbox, self.loop)

    def __enter__(self) -> "EvalRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(owned: frozenset, rewards: Any, sandbox: Any, loop: Any) -> None:
    try:
        if "rewards" in owned and rewards is not None:
            rewards.close()
    finally:
        try:
            if "sandbox" in owned and sandbox is not None and loop is not None and not loop.is_closed():
                loop.run_until_complete(sandbox.close())
        finally:
            if "loop" in owned and loop is not None and not loop.is_closed():
                loop.close()


def build_eval_runtime(cfg: Any, tok: Any, *, files: Optional[Sequence[str]] = None,
                       rows: Optional[list[dict]] = None, stats: Optional[dict] = None, limit: int = 0,
                       max_prompt_length: Optional[int] = None, files_key: str = "eval.files",
                       tools: Optional[list[dict]] = None, model: Any = None, engine: Any = None,
                       sandbox: Any = None, loop: Optional[asyncio.AbstractEventLoop] = None, rewards: Any = None,
                       eval_cfg: Any = None, agent_cfg: Any = None, seed: Optional[int] = None) -> EvalRuntime:
    """The eval set-up of ``cfg``; every part not given is built here.

    ``rows`` (already loaded, e.g. by a preflight) or ``files`` (loaded with :func:`load_eval_rows`,
    ``limit`` / ``max_prompt_length`` as there; ``files_key`` names the config key in the error when
    no row is left). ``tools``: default :func:`tool_schemas`. ``engine``: default
    :func:`eval_engine` over ``model`` (default: the checkpoint at ``model.path``, loaded only once
    the rows are known). ``sandbox`` / ``loop`` / ``rewards``: default
    a new event loop, :func:`~sod_jax.sandbox.factory.make_sandbox`, a
    :class:`~sod_jax.rewards.RewardPool` over that sandbox; given ones are borrowed (the runtime never
    closes them). ``eval_cfg``: default ``cfg.eval``; ``agent_cfg``: default
    ``AgentConfig.from_config(cfg)``; ``seed``: default ``eval_cfg.seed``.
    """

    eval_cfg = cfg.eval if eval_cfg is None else eval_cfg
    tools = tool_schemas(cfg) if tools is None else list(tools)
    if rows is None:
        if files is None:
            raise TypeError("build_eval_runtime needs rows or files")
        rows, stats = load_eval_rows(cfg, tok, files, tools=tools, max_prompt_length=max_prompt_length, limit=limit)
    if not rows:
        limit_key = "data.max_prompt_length" if max_prompt_length is None else "max_prompt_length"
        max_len = cfg.data.max_prompt_length if max_prompt_length is None else max_prompt_length
        named = [files] if isinstance(files, str) else list(files or [])
        raise EvalError(f"{files_key} {named}: no prompt left after the length filter "
                        f"({limit_key}={max_len}): {json.dumps(stats or {}, default=str)}")
    if engine is None:
        if model is None:  # a cache that cannot fit fails before the weights load
            check_eval_kv_cache(cfg, *eval_engine_sizes(cfg, tok, rows, tools, eval_cfg))
        engine = eval_engine(cfg, load_eval_model(cfg) if model is None else model, tok, rows, tools, eval_cfg)
    owned: set[str] = set()
    try:
        if loop is None:
            loop = asyncio.new_event_loop()
            owned.add("loop")
        if sandbox is None:
            sandbox = make_sandbox(cfg.sandbox)
            owned.add("sandbox")
        if rewards is None:
            rewards = RewardPool(cfg.reward, sandbox=sandbox)
            owned.add("rewards")
    except BaseException:
        _close(frozenset(owned), None, sandbox, loop)
        raise
    return EvalRuntime(tok=tok, tools=tools, rows=list(rows), engine=engine, sandbox=sandbox, loop=loop,
                       rewards=rewards, agent_cfg=AgentConfig.from_config(cfg) if agent_cfg is None else agent_cfg,
                       eval_cfg=eval_cfg, seed=int(getattr(eval_cfg, "seed", 0) if seed is None else seed),
                       stats=dict(stats or {}), owned=frozenset(owned))


__all__ = ["EvalRuntime", "build_eval_runtime", "eval_engine", "load_eval_model", "load_eval_rows", "tool_schemas"]
