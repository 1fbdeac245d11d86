"""The RL loop (DESIGN §3): prompts -> tool-using rollouts -> rewards -> one compiled update ->
metrics, periodic eval, checkpoints.

:class:`Trainer` is built from a :class:`sod_jax.config.Config` in two phases:

1. :meth:`Trainer.preflight` checks everything that can be checked without compiling anything
   (paths, the teacher's vocabulary and special tokens, data rows and their ``data_source``
   scorers, the sandbox's isolation) and fails with a one-line message saying what to change;
2. :meth:`Trainer.setup` loads the models onto the mesh, builds the engine (its own sampling copy
   of the student's weights), the agent, the reward pool, the optimizer state and the update, and
   the loop's hooks (preemption, checkpoints with auto-resume from the run directory).

:meth:`Trainer.run` is the shared loop skeleton (:class:`sod_jax.loop.Loop`); per step
(:meth:`Trainer.train_step`): ``train.prompts_per_step`` prompts of this process's data
shard -> ``rollout.n`` trajectories each through the agent loop (sampling keys derived from
``(train.seed, step, prompt)``, so a resumed run samples the same streams) -> rewards in the pool
-> an :class:`RLBatch` whose length is one of a few buckets -> one update -> the engine's weights
refreshed -> metrics (with ``compiles`` / ``compile_s``: the programs compiled since the previous
step's record, counted from JAX's compile events; the first step's record also holds the start-up
set, ``startup_compiles`` / ``startup_compile_s``); eval every ``train.eval_every`` steps (and at
step 0); a checkpoint every ``checkpoint.save_every`` steps, at the end, and on SIGTERM/SIGINT.

Every process runs the same loop on its own prompts; trajectories meet in the global update
(``jax.make_array_from_process_local_data``) with the sequence length agreed across processes;
only process 0 writes files and prints.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from sod_jax import compile_cache, parallel, paths, programs
from sod_jax.algo import modes
from sod_jax.algo.advantages import overlong_penalty
from sod_jax.chat import ChatError, ChatTokenizer
from sod_jax.checkpoint import Checkpointer, PreemptionGuard
from sod_jax.compile_cache import CompileCounter, CompileStats
from sod_jax.config import Config
from sod_jax.data import PromptLoader, load_prompt_rows
from sod_jax.evaluation import runtime as eval_runtime
from sod_jax.loop import CheckpointHook, Loop, PreemptionHook
from sod_jax.models.hf import (
    CheckpointError,
    config_to_hf,
    load_pretrained,
    np_dtype,
    read_config,
    resolve_checkpoint_dir,
)
from sod_jax.rewards import RewardPool, response_text
from sod_jax.plan.preflight import PlanRefusal, preflight_plan
from sod_jax.programs import Program
from sod_jax.rl import programs as rl_programs
from sod_jax.rl.batch import length_buckets, pack, pick_bucket
from sod_jax.rl.rollouts import (
    StepRollouts,
    eval_line,
    rollout_metrics,
    step_line,
    step_weight_samples,
    trajectory_table,
)
from sod_jax.rl.update import (
    UpdateSpec,
    build_update,
    check_compatible,
    make_train_state,
    num_optimizer_steps,
    sequence_logprobs,
)
from sod_jax.rollout.agent import Agent, AgentConfig, AgentRequest, EnginePolicy
from sod_jax.rollout.engine import Engine, engine_options
from sod_jax.rollout.sampling import SamplingParams
from sod_jax.rollout.sizes import DEFAULT_BUDGET_SOURCE, default_kv_budget_bytes, kv_budget_problem, slot_devices
from sod_jax.sandbox.factory import make_sandbox
from sod_jax.sandbox.protocol import SandboxUnavailable
from sod_jax.tracking import RunDir

log = logging.getLogger("sod_jax.train")


class SetupError(RuntimeError):
    """A problem found before any compute; the message says what to change."""


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of one prompt of one step: a stable hash, independent of process layout."""
    return zlib.crc32(f"{seed}:{step}:{index}".encode()) & 0x7FFFFFFF


def step_split_problem(prompts_per_step: int, n: int, mini_batches: int, processes: int,
                       batch_devices: Optional[int] = None) -> Optional[str]:
    """Why one RL step cannot be split as the loop needs, or None. Each process takes
    ``prompts_per_step // processes`` prompts and fills ``prompts_per_step * n // processes`` rows;
    the update deals the global rows to ``mini_batches``; in a multi-process run the global rows are
    one array split over the batch devices (mesh data x fsdp), which must divide it (a single
    process replicates an axis that does not divide instead)."""
    rows = prompts_per_step * n
    if prompts_per_step % processes:
        return (f"train.prompts_per_step ({prompts_per_step}) must be divisible by the process count ({processes}): "
                f"each process takes prompts_per_step / processes prompts, the rest would be silently replaced by padding")
    if rows % mini_batches:
        return (f"train.prompts_per_step * rollout.n ({prompts_per_step} * {n} = {rows}) must be divisible by "
                f"train.mini_batches ({mini_batches})")
    if processes > 1 and batch_devices and rows % batch_devices:
        return (f"train.prompts_per_step * rollout.n ({prompts_per_step} * {n} = {rows}) must be divisible by the "
                f"batch-parallel devices (mesh.data x mesh.fsdp = {batch_devices}) in a {processes}-process run")
    return None


class Trainer(Loop):
    """See the module docstring. The loop itself is :class:`sod_jax.loop.Loop`'s; this class
    supplies one step (:meth:`train_step`), the evaluation, the step record and the checkpoint
    contents, with preemption and checkpoints as hooks."""

    def __init__(self, cfg: Config, *, progress: bool = True):
        super().__init__(progress=progress)
        self.cfg = cfg
        self.desc = f"{cfg.algo.name} RL"
        self.out = paths.as_path(cfg.train.out_dir)
        self.loader_iter = None
        self.first_eval = self.last_eval = None
        # One event loop for every rollout of the run: the sandbox's queues belong to the loop that
        # first used them.
        self.loop = asyncio.new_event_loop()
        # SIGTERM / SIGINT from here on (set-up, compilation, the first eval) stop the run at the next
        # step boundary, agreed across processes (the loop's PreemptionHook reads it).
        self.guard = PreemptionGuard().__enter__()
        # Compilations (JAX's own events): the start-up set before the first step, then per step.
        self.compile_counter = CompileCounter()
        self.startup_compiles: Optional[CompileStats] = None

    # -----------------------------------------------------------------------------------------
    # Phase 1: checks before any compute
    # -----------------------------------------------------------------------------------------

    def preflight(self) -> None:
        cfg = self.cfg
        mode = cfg.algo.name
        self.needs_teacher = modes.needs_teacher_model(mode)
        if not cfg.model.path:
            raise SetupError("model.path is not set: point it at the HF checkpoint directory of the student")
        try:
            self.student_dir = resolve_checkpoint_dir(cfg.model.path)
            self.student_cfg = read_config(self.student_dir)
        except CheckpointError as e:
            raise SetupError(f"model.path: {e}") from None
        tok_dir = Path(getattr(cfg.model, "tokenizer", None) or self.student_dir)
        try:
            self.tok = ChatTokenizer.from_dir(tok_dir)
        except ChatError as e:
            raise SetupError(f"tokenizer: {e} (set model.tokenizer to a directory with tokenizer.json)") from None
        if self.tok.vocab_size > self.student_cfg.vocab_size:
            raise SetupError(f"tokenizer {tok_dir} has {self.tok.vocab_size} tokens but the student's vocab_size is "
                             f"{self.student_cfg.vocab_size}; use the student's own tokenizer")
        self.teacher_dir = self.teacher_cfg = None
        if self.needs_teacher:
            if not cfg.teacher.path:
                raise SetupError(f"algo.name={mode} needs a teacher: set teacher.path to an HF checkpoint directory "
                                 f"(or use algo.name={' / '.join(modes.without_teacher_model())})")
            try:
                self.teacher_dir = resolve_checkpoint_dir(cfg.teacher.path)
                self.teacher_cfg = read_config(self.teacher_dir)
            except CheckpointError as e:
                raise SetupError(f"teacher.path: {e}") from None
            t_special = None
            if (self.teacher_dir / "tokenizer.json").is_file():
                t_tok = ChatTokenizer.from_dir(self.teacher_dir)
                t_special = _special_ids(t_tok)
            try:
                check_compatible(self.student_cfg, self.teacher_cfg, _special_ids(self.tok), t_special)
            except ValueError as e:
                raise SetupError(f"{e} (student {self.student_dir}, teacher {self.teacher_dir})") from None
        self._check_kv_cache()
        # Data: rows, scorers, templates, lengths (incl. the tool block the agent renders).

        if not cfg.data.train_files:
            raise SetupError("data.train_files is empty: list the RL parquet/jsonl files")
        for f in list(cfg.data.train_files) + list(cfg.data.val_files):
            if not paths.is_file(f):
                raise SetupError(f"data file '{f}' does not exist (data.train_files / data.val_files)")
        self.tools = eval_runtime.tool_schemas(cfg)
        kw = dict(reward_cfg=cfg.reward, tools=self.tools, enable_thinking=cfg.rollout.enable_thinking)
        try:
            self.train_rows, self.train_stats = load_prompt_rows(cfg.data.train_files, cfg.data, self.tok, kind="rl", **kw)
            self.val_rows, self.val_stats = [], {}
            if cfg.data.val_files:
                self.val_rows, self.val_stats = eval_runtime.load_eval_rows(
                    cfg, self.tok, cfg.data.val_files, tools=self.tools,
                    max_prompt_length=getattr(cfg.eval, "max_prompt_length", cfg.data.max_prompt_length))
        except ValueError as e:
            raise SetupError(str(e)) from None
        self.dropped_long = self.train_stats.get("too_long", 0)
        if not self.train_rows:
            raise SetupError(f"no training prompt is shorter than data.max_prompt_length={cfg.data.max_prompt_length} "
                             f"tokens ({self.dropped_long} dropped); raise it or check the data")
        if len(self.train_rows) < cfg.train.prompts_per_step:
            raise SetupError(f"data.train_files hold {len(self.train_rows)} usable prompts but train.prompts_per_step "
                             f"is {cfg.train.prompts_per_step}; lower it or add data")
        self._check_step_split()
        # The capacity plan (compile.plan): the slowest check, so the last before the sandbox; no weights yet.
        try:
            self.plan_report = preflight_plan(cfg, job="train", out_dir=cfg.train.out_dir,
                                              is_main=jax.process_index() == 0)
        except PlanRefusal as e:
            raise SetupError(str(e)) from None
        # Sandbox: built now so an executor that cannot isolate fails before compiling anything.
        self.sandbox = self._make_sandbox()

    def _check_step_split(self) -> None:
        """The step's prompts and rows split evenly over the processes and batch devices."""
        cfg = self.cfg
        batch_devices = None
        if jax.process_count() > 1:
            try:
                d, f, _ = parallel.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, jax.device_count())
                batch_devices = d * f
            except ValueError:
                batch_devices = None  # a bad mesh is reported by setup, naming the mesh keys
        problem = step_split_problem(cfg.train.prompts_per_step, cfg.rollout.n, cfg.train.mini_batches,
                                     jax.process_count(), batch_devices)
        if problem:
            raise SetupError(problem)

    def _check_kv_cache(self) -> None:
        """The engine's KV-cache check (same arithmetic, its cache dtype model.dtype, its slot length)
        from the student's config alone: a cache that cannot fit fails here, before any weights load."""
        cfg, r = self.cfg, self.cfg.rollout
        max_len = cfg.data.max_prompt_length + r.max_response_length
        if r.kv_cache_budget_gb:
            budget, src = int(r.kv_cache_budget_gb * 2**30), "rollout.kv_cache_budget_gb"
        else:
            weight_bytes = self.student_cfg.num_params() * np_dtype(cfg.model.dtype).itemsize
            budget, src = default_kv_budget_bytes(weight_bytes), DEFAULT_BUDGET_SOURCE
        m = cfg.mesh
        _, _, tensor = parallel.resolve_mesh_shape(m.data, m.fsdp, m.tensor, jax.device_count())
        # the engine splits its slots over this host's devices outside the tensor axis
        host = {"fsdp": max(jax.local_device_count() // tensor, 1)}
        problem = kv_budget_problem(self.student_cfg, r.num_slots, max_len, cfg.model.dtype, budget, src,
                                    min_slots=r.n, devices=slot_devices(r.num_slots, host))
        if problem:
            raise SetupError(problem)

    def _make_sandbox(self):
        try:
            return make_sandbox(self.cfg.sandbox)
        except SandboxUnavailable as e:
            raise SetupError(f"sandbox: {e}") from None

    # -----------------------------------------------------------------------------------------
    # Phase 2: models, engine, update, resume
    # -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.mesh_from_config(cfg.mesh)
        runtime = dict(scan_layers=cfg.model.scan_layers, remat=cfg.model.remat,
                       attention_block=cfg.model.attention_block)
        self.student = load_pretrained(self.student_dir, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                       mesh=self.mesh, **runtime)
        self.s_graph, params = nnx.split(self.student)
        self.t_graph = self.t_params = None
        if self.needs_teacher:
            teacher = load_pretrained(self.teacher_dir, dtype=cfg.teacher.dtype, param_dtype=cfg.teacher.param_dtype,
                                      mesh=self.mesh, scan_layers=cfg.model.scan_layers, remat="none",
                                      attention_block=getattr(cfg.teacher, "attention_block", cfg.model.attention_block))
            self.t_graph, self.t_params = nnx.split(teacher)
        # Data order: this process's shard, restorable.
        self.loader = PromptLoader(self.train_rows, cfg.train.prompts_per_step // jax.process_count(),
                                   seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.total_steps = self._total_steps()
        self.opt_steps = num_optimizer_steps(cfg.train, self.total_steps)
        self.tx, self.state, shardings = make_train_state(cfg, params, self.opt_steps, self.mesh)
        self.spec = UpdateSpec.from_config(cfg)
        self.update = Program("update", build_update(self.spec, self.tx, self.s_graph, self.t_graph, mesh=self.mesh,
                                                     state_shardings=shardings))
        self.kl_forward = Program("heldout_kl", self._kl_program()) if self.needs_teacher else None
        self.max_len = cfg.data.max_prompt_length + cfg.rollout.max_response_length
        self.buckets = list(getattr(cfg.train, "length_buckets", None) or length_buckets(self.max_len))
        budget = cfg.rollout.kv_cache_budget_gb
        self.engine = Engine(self.student, num_slots=cfg.rollout.num_slots, max_len=self.max_len,
                             decode_steps=cfg.rollout.decode_steps, prefill_buckets=cfg.rollout.prefill_buckets,
                             **engine_options(cfg.rollout),
                             stop_ids=self.tok.stop_ids, tokenizer=self.tok,
                             kv_budget_bytes=int(budget * 2**30) if budget else None)
        self.engine.update_params(self.state.params)
        self.agent = Agent(self.tok, self.sandbox, AgentConfig.from_config(cfg))
        self.rewards = RewardPool(cfg.reward, sandbox=self.sandbox)
        self.run_dir = RunDir(self.out, enabled=self.is_main, tensorboard=cfg.logging.tensorboard,
                              wandb=cfg.logging.wandb, project=cfg.logging.project, config=cfg.to_dict())
        ck = cfg.checkpoint
        self.ckpt = Checkpointer.from_config(ck, self.out)
        # Preemption first: a signal seen at a step boundary makes the checkpoint hook save that step.
        self.hooks = [PreemptionHook(self.guard), CheckpointHook(self.ckpt, save_every=ck.save_every, resume=ck.resume,
                                                       timing_key="time/checkpoint")]
        self.compiled_shapes: set = set()
        self.run_dir.write_text("config.yaml", cfg.to_yaml())
        if cfg.compile.warmup:
            self.warm_up()

    def program_calls(self) -> list:
        """Every program this run compiles (see :mod:`sod_jax.rl.programs`), with abstract inputs."""
        cfg = self.cfg
        calls = self.engine.program_calls(rl_programs.engine_phases(cfg, self.needs_teacher, bool(self.val_rows)))
        rows = cfg.train.prompts_per_step * cfg.rollout.n  # the global batch
        calls += rl_programs.update_calls(self.update, self.state, self.t_params, rows, self.buckets,
                                          modes.get(cfg.algo.name).self_teacher, self.mesh)
        kl_rows = min(int(getattr(cfg.eval, "kl_prompts", 0) or 0), len(self.val_rows or []))
        if self.kl_forward is not None and kl_rows:
            calls += rl_programs.kl_calls(self.kl_forward, self.state.params, self.t_params, kl_rows, self.buckets,
                                          self.mesh)
        return calls

    def warm_up(self) -> None:
        """Compile the whole program set before step 1 (``compile.warmup``)."""
        calls = programs.unique(self.program_calls())
        self.say(f"warm-up: compiling {len(calls)} programs before step 1")
        programs.warm_up(calls, progress=self.progress and self.is_main, say=self.say if self.is_main else None)
        warm_checkpoint_slices(self.state)

    def _kl_program(self):
        """The held-out KL: student-teacher k1 over response tokens of a packed batch."""
        chunk = self.cfg.model.logprob_chunk
        s_graph, t_graph = self.s_graph, self.t_graph

        @jax.jit
        def kl(s_params, t_params, ids, pos, att, mask):
            s, _ = sequence_logprobs(s_graph, s_params, ids, pos, att, chunk)
            q, _ = sequence_logprobs(t_graph, t_params, ids, pos, att, chunk)
            m = mask.astype(s.dtype)
            return (m * (s - q.astype(s.dtype))).sum() / jax.numpy.maximum(m.sum(), 1.0)

        return kl

    def _total_steps(self) -> int:
        t = self.cfg.train
        if getattr(t, "total_steps", None):
            return int(t.total_steps)
        epochs = getattr(t, "total_epochs", 1) or 1
        return max(1, int(math.ceil(epochs * self.loader.steps_per_epoch)))

    # -- checkpoint contents (sod_jax.loop.CheckpointHook) ---------------------------------------

    def checkpoint_state(self) -> Any:
        return self.state

    def checkpoint_extra(self, step: int) -> dict:
        return {"rl_step": step, "data_state": self.loader.get_state(), "config": self.cfg.to_dict(),
                "hf_config": config_to_hf(self.student.config, self.cfg.model.param_dtype)}

    def restore(self, step: int, state: Any, extra: dict) -> None:
        """Params, optimizer state, PRNG and the data position of checkpoint ``step``; records of later
        steps are dropped from the run directory (the resumed run writes them again)."""
        self.state = state
        self.loader.set_state(extra["data_state"])
        self.step = int(extra["rl_step"])
        self.run_dir.truncate_after(self.step)
        self.engine.update_params(self.state.params)
        log.warning("resumed from checkpoint step %d (RL step %d): params, optimizer, PRNG and data order restored",
                    step, self.step)

    # -----------------------------------------------------------------------------------------
    # One step
    # -----------------------------------------------------------------------------------------

    def _requests(self, rows: list[dict], step: int, n: int, first_index: int) -> list:
        return [AgentRequest(r["prompt"], n=n, seed=prompt_seed(self.cfg.train.seed, step, first_index + i),
                             id=first_index + i) for i, r in enumerate(rows)]

    def _rollout(self, rows: list[dict], step: int) -> StepRollouts:
        r = self.cfg.rollout
        t0 = time.perf_counter()
        offset = self.loader.global_index(0)  # this process's rows are a block of the global batch
        reqs = self._requests(rows, step, r.n, offset)
        policy = EnginePolicy(self.engine, SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k))
        trajs = self.loop.run_until_complete(self.agent.run(policy, reqs))
        t1 = time.perf_counter()
        traj_rows = [rows[i] for i in range(len(rows)) for _ in range(r.n)]
        group_ids = [offset + i for i in range(len(rows)) for _ in range(r.n)]
        items = [dict(data_source=row["data_source"], solution=response_text(self.tok, t.response_ids),
                      ground_truth=row["ground_truth"], extra_info=row.get("extra_info") or {})
                 for t, row in zip(trajs, traj_rows)]
        scores = self.rewards.score(items)
        rewards = [float(s["score"]) for s in scores]
        rc = self.cfg.reward
        if rc.overlong_buffer:
            for i, t in enumerate(trajs):
                rewards[i] += overlong_penalty(len(t.response_ids), r.max_response_length, rc.overlong_buffer_len,
                                               rc.overlong_penalty_factor)
        return StepRollouts(trajs, traj_rows, group_ids, scores, rewards, t1 - t0, time.perf_counter() - t1)

    def _teacher_prompts(self, ro: StepRollouts) -> Optional[list[list[int]]]:
        mode = modes.get(self.cfg.algo.name)
        if not mode.self_teacher:
            return None
        out, cache = [], {}
        for row in ro.rows:
            key = id(row)
            if key not in cache:
                priv = mode.privileged_text(row)
                msgs = [dict(m) for m in row["prompt"]]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
                msgs[last]["content"] = self.cfg.algo.opsd_template.format(prompt=msgs[last]["content"], privileged=priv)
                cache[key] = self.agent.prompt_ids(msgs)
            out.append(cache[key])
        return out

    def _gathered(self, table: np.ndarray) -> np.ndarray:
        """Every process's rows of ``table`` (``[n, k]``, the same n on every process), in process
        order: the figures of the global batch."""
        if jax.process_count() == 1:
            return table
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(table)).reshape(-1, table.shape[1])

    def _agreed_length(self, need: int) -> int:
        """The bucket for the longest sequence of any process (every process compiles the same shape)."""

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            need = int(np.max(multihost_utils.process_allgather(np.asarray([need]))))
        return pick_bucket(need, self.buckets)

    def _batch(self, ro: StepRollouts):
        cfg = self.cfg
        rows = cfg.train.prompts_per_step * cfg.rollout.n // jax.process_count()
        longest = max(len(t.prompt_ids) + len(t.response_ids) for t in ro.trajectories)
        t_prompts = self._teacher_prompts(ro)
        L = self._agreed_length(longest)
        Lt = None
        if t_prompts is not None:
            Lt = self._agreed_length(max(len(p) + len(t.response_ids) for p, t in zip(t_prompts, ro.trajectories)))
        batch = pack(ro.trajectories, ro.rewards, ro.group_ids, rows, L, self.tok.pad_id, t_prompts, Lt)
        self._batch_tokens = int(batch.attention_mask.sum())  # on the host: no device reduction to compile
        return parallel.put_batch(batch, self.mesh), (L, Lt)

    def train_step(self, step: int) -> dict:
        """Rollouts of this step's prompts, their rewards and one update; returns the step's metrics."""
        if self.loader_iter is None:  # after a restore has set the data position
            self.loader_iter = iter(self.loader)
        startup = None
        if self.startup_compiles is None:  # the first step this process runs: what compiled before it
            startup = self.startup_compiles = self.compile_counter.take()
            if self.is_main:
                self.say(f"start-up: {startup.line()} before step {step}")
        rows = next(self.loader_iter)
        ro = self._rollout(rows, step)
        t0 = time.perf_counter()
        batch, shape = self._batch(ro)
        self.state, metrics = self.update(self.state, self.t_params, batch)
        metrics = jax.device_get(metrics)
        t_update = time.perf_counter() - t0
        self.compiled_shapes.add(shape)
        t_sync = time.perf_counter()
        self.engine.update_params(self.state.params)
        jax.block_until_ready(self.engine.params)
        t_sync = time.perf_counter() - t_sync
        out = {k: (v.tolist() if np.ndim(v) else float(v)) for k, v in metrics.items()
               if not k.startswith("sample_step_")}
        out.update(rollout_metrics(ro, self._gathered(trajectory_table(ro))))
        tokens = self._batch_tokens if jax.process_count() == 1 else None
        out.update({"time/rollout": ro.seconds, "time/reward": ro.reward_seconds, "time/update": t_update, "time/weight_sync": t_sync,
                    "update_compiles": len(self.compiled_shapes), "batch_length": shape[0],
                    "optimizer_step": int(self.state.step)})
        if tokens:
            out["update_tokens_per_s"] = tokens / max(t_update, 1e-9)
        if startup is not None:
            out.update(startup.metrics("startup_", cache=compile_cache.cache_dir() is not None))
        self.run_dir.log_step_weights(step, step_weight_samples(self.tok, metrics, ro))
        return out

    # -----------------------------------------------------------------------------------------
    # Eval and held-out KL
    # -----------------------------------------------------------------------------------------

    def evaluate(self, step: int) -> Optional[dict]:
        if not self.val_rows:
            return None

        t0 = time.perf_counter()
        if getattr(self, "_eval_rt", None) is None:
            # The eval set-up over the live engine, sandbox, event loop and reward pool of training:
            # borrowed, never closed by the runtime.
            self._eval_rt = eval_runtime.build_eval_runtime(
                self.cfg, self.tok, rows=self.val_rows, stats=self.val_stats, tools=self.tools, engine=self.engine,
                sandbox=self.sandbox, loop=self.loop, rewards=self.rewards, eval_cfg=self.cfg.eval,
                seed=self.cfg.train.seed)
        summary = self._eval_rt.run(step, progress=self.progress and self.is_main)
        if self.needs_teacher and getattr(self.cfg.eval, "kl_prompts", 0):
            summary["heldout_kl"] = self.heldout_kl(step)
        summary["seconds"] = time.perf_counter() - t0
        self.run_dir.log_eval(step, summary)
        if step > 0:
            self.add_metrics(step, **{"time/eval": summary["seconds"]})
        if self.first_eval is None and step == 0:
            self.first_eval = summary
        self.last_eval = summary
        self.say(f"step {step} eval: {eval_line(summary)}")
        return summary

    def heldout_kl(self, step: int) -> float:
        """Student-teacher reverse KL (k1 = E[s - q] over response tokens) on student rollouts of the
        first ``eval.kl_prompts`` held-out prompts (fixed seeds, so the curve compares like with like)."""

        cfg = self.cfg
        rows = self.val_rows[: cfg.eval.kl_prompts]
        reqs = self._requests(rows, -1, 1, 0)
        r = cfg.rollout
        policy = EnginePolicy(self.engine, SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k))
        trajs = self.loop.run_until_complete(self.agent.run(policy, reqs))
        L = self._agreed_length(max(len(t.prompt_ids) + len(t.response_ids) for t in trajs))
        p = pack(trajs, [0.0] * len(trajs), list(range(len(trajs))), len(trajs), L, self.tok.pad_id)
        # Every process holds the same rows (the whole batch): placed as one global batch, not P copies.
        arrays = (p.input_ids, p.positions, p.attention_mask, p.response_mask)
        if len(trajs) % self.mesh.size == 0:
            arrays = parallel.put_batch(arrays, self.mesh, process_local=False)
        return float(self.kl_forward(self.state.params, self.t_params, *arrays))

    # -----------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------

    def eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0

    def end_of_step(self, step: int) -> None:
        """The step's record to ``metrics.jsonl`` (every ``logging.log_every`` steps, the last one and a
        stopping one) and its line."""
        # Everything compiled since the previous step's record: rollouts, update, eval, checkpoint.
        compiled = self.compile_counter.take()
        self.add_metrics(step, **compiled.metrics(cache=compile_cache.cache_dir() is not None))
        metrics = self.step_metrics.pop(step, {})
        if step % self.cfg.logging.log_every == 0 or step == self.total_steps or self.stopping:
            self.run_dir.log_metrics(step, metrics)
        line = step_line(metrics)
        if compiled.compiles:
            line += f" | {compiled.compiles} compiles ({compiled.seconds:.1f} s)"
        self.say(f"step {step}/{self.total_steps}: {line}")

    def finish(self) -> dict:
        self.ckpt.wait()
        if self.cfg.logging.plots:
            self.run_dir.plot()
        return {"first_eval": self.first_eval, "last_eval": self.last_eval, "steps": self.step}

    def close(self) -> None:
        self.guard.__exit__(None, None, None)
        for name in ("ckpt", "rewards"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        sb = getattr(self, "sandbox", None)
        if sb is not None and not self.loop.is_closed():
            self.loop.run_until_complete(sb.close())
        if not self.loop.is_closed():
            self.loop.close()
        rd = getattr(self, "run_dir", None)
        if rd is not None:
            rd.close()


def warm_checkpoint_slices(state: Any) -> None:
    """Compile the small per-device slice programs orbax's checkpoint writer runs on replicated arrays
    (replica-parallel saving: each replica writes a slice), so the first save compiles nothing. They
    are computed and dropped (a fraction of each replicated array, transiently). Skipped, with a
    debug line, if orbax's internal module is not where this version has it."""
    try:
        from orbax.checkpoint._src.serialization import replica_slices
    except ImportError as e:  # pragma: no cover - another orbax layout
        log.debug("checkpoint slice warm-up skipped: %s", e)
        return
    try:
        for arr in jax.tree.leaves(state):
            if isinstance(arr, jax.Array):
                for rs in replica_slices.get_replica_slices(arr, 0, True).replica_slices:
                    rs.data()
    except Exception as e:  # noqa: BLE001 - a warm-up only: the save itself still works
        log.debug("checkpoint slice warm-up skipped: %s", e)


def _special_ids(tok) -> dict:
    names = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>",
             "</tool_response>", "<think>", "</think>")
    return {n: tok.tok.token_to_id(n) for n in names}
