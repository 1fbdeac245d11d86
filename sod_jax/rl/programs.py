"""The RL run's program set, enumerated from the config before step 1.

Everything a run compiles is one of:

* the engine's programs (:meth:`sod_jax.rollout.engine.Engine.program_calls`) for each *phase* of
  the run: the training rollouts (``rollout.n`` samples, the rollout sampling), the evaluation
  (``eval.n`` samples, the eval sampling) and the held-out KL rollouts (one sample, when
  ``eval.kl_prompts`` is set);
* the update, once per length bucket (``train.length_buckets``; for a self-teacher mode, once
  per pair of student and teacher buckets);
* the held-out KL forward, once per length bucket.

The trainer's warm-up (``compile.warmup``) compiles this set with abstract inputs, so no step
stalls on a compilation; :func:`engine_phases` and :func:`batch_shapes` are also what the
planner uses.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sod_jax import parallel
from sod_jax.algo import modes
from sod_jax.models.qwen3 import Qwen3, Qwen3Config, as_dtype
from sod_jax.programs import Call, Program, abstract
from sod_jax.rl.batch import RLBatch
from sod_jax.rollout.engine import Engine, Phase, engine_options, sampling_weights
from sod_jax.rollout.sampling import SamplingParams, mode_of

# A tool turn appends the tool texts plus the chat template around them (the end of the assistant
# turn, the tool role header, <tool_response> tags, the next assistant header).
TEMPLATE_TOKENS = 64


def tool_turn_tokens(cfg: Any) -> int:
    """An upper bound on the tokens one tool turn appends: per executed call its text (at most
    ``tool.max_output_chars`` characters plus the truncation note; two tokens a character leaves
    room for text that tokenizes badly) and the template. A longer turn still runs; its extension
    width then compiles when it first appears."""
    t = cfg.tool
    per_call = 2 * (int(t.max_output_chars) + 32) + TEMPLATE_TOKENS
    return max(1, int(t.max_parallel_calls)) * per_call + TEMPLATE_TOKENS


def _mode(temperature: float, top_p: float = 1.0, top_k: int = -1) -> str:
    if float(temperature) <= 0:
        return mode_of(SamplingParams(greedy=True))
    return mode_of(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))


def engine_phases(cfg: Any, needs_teacher: bool, with_eval: bool = True) -> list[Phase]:
    """The engine phases of an RL run of ``cfg`` (see the module docstring)."""
    r, e = cfg.rollout, cfg.eval
    max_len = cfg.data.max_prompt_length + r.max_response_length
    extend = tool_turn_tokens(cfg)
    rollout_mode = _mode(r.temperature, r.top_p, r.top_k)
    phases = [Phase(int(r.n), rollout_mode, int(cfg.data.max_prompt_length), extend, "rollouts")]
    if with_eval:
        phases.append(Phase(int(e.n), _mode(e.temperature, e.top_p), min(int(e.max_prompt_length), max_len - 1),
                            extend, "eval"))
        if needs_teacher and int(getattr(e, "kl_prompts", 0) or 0):
            phases.append(Phase(1, rollout_mode, int(cfg.data.max_prompt_length), extend, "heldout_kl"))
    return phases


def batch_shapes(rows: int, length: int, teacher_length: Optional[int] = None,
                 mesh: Optional[Mesh] = None) -> RLBatch:
    """The :class:`RLBatch` of ``rows x length`` that :func:`sod_jax.rl.batch.pack` and
    :func:`sod_jax.parallel.put_batch` make, as ``jax.ShapeDtypeStruct`` s (rows split over the batch
    mesh axes, like the real placement)."""

    def sds(shape, dtype):
        sharding = None
        if mesh is not None:
            axes = ["batch"] + [None] * (len(shape) - 1)
            sharding = NamedSharding(mesh, parallel.logical_to_spec(axes, shape, mesh, parallel.DEFAULT_RULES))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    i32, f32 = jnp.int32, jnp.float32
    B, L = rows, length
    teacher = {}
    if teacher_length is not None:
        Lt = teacher_length
        teacher = dict(teacher_input_ids=sds((B, Lt), i32), teacher_attention_mask=sds((B, Lt), i32),
                       teacher_positions=sds((B, Lt), i32), teacher_index=sds((B, L), i32))
    return RLBatch(sds((B, L), i32), sds((B, L), i32), sds((B, L), i32), sds((B, L), i32), sds((B,), f32),
                   sds((B,), i32), sampler_logp=sds((B, L), f32), row_valid=sds((B,), jnp.bool_),
                   response_len=sds((B,), i32), **teacher)


def update_calls(update: Program, state: Any, teacher_params: Any, rows: int, buckets: Sequence[int],
                 self_teacher: bool, mesh: Optional[Mesh]) -> list[Call]:
    """The update for every length bucket (x every teacher bucket for a self-teacher mode)."""
    st, tp = abstract(state), abstract(teacher_params)
    calls = []
    for L in buckets:
        for Lt in (buckets if self_teacher else [None]):
            label = f"update {rows}x{L}" + (f" (teacher {Lt})" if Lt else "")
            calls.append(Call(update, (st, tp, batch_shapes(rows, L, Lt, mesh)), {}, label))
    return calls


def kl_calls(kl: Program, params: Any, teacher_params: Any, rows: int, buckets: Sequence[int],
             mesh: Optional[Mesh]) -> list[Call]:
    """The held-out KL forward of ``rows`` sequences for every length bucket."""
    sp, tp = abstract(params), abstract(teacher_params)
    spread = mesh if mesh is not None and rows % mesh.size == 0 else None  # as the trainer places them
    calls = []
    for L in buckets:
        b = batch_shapes(rows, L, None, spread)
        calls.append(Call(kl, (sp, tp, b.input_ids, b.positions, b.attention_mask, b.response_mask), {},
                          f"heldout_kl {rows}x{L}"))
    return calls


def engine_calls_for(cfg: Any, model_cfg: Qwen3Config) -> list[Call]:
    """The engine's program set of an RL run of ``cfg`` from the student's architecture alone
    (abstract weights: nothing is loaded, allocated or compiled). Used to count a config's programs
    (the docs' table, a test) and by the planner."""
    mc = model_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    source = jax.eval_shape(lambda: Qwen3(mc, rngs=nnx.Rngs(0)).weights())
    params = jax.eval_shape(partial(sampling_weights, mc, dtype=as_dtype(mc.dtype)), source)
    r = cfg.rollout
    engine = Engine.abstract(mc, params, source, num_slots=r.num_slots,
                             max_len=cfg.data.max_prompt_length + r.max_response_length, decode_steps=r.decode_steps,
                             prefill_buckets=r.prefill_buckets, **engine_options(r))
    needs_teacher = modes.needs_teacher_model(cfg.algo.name)
    return engine.program_calls(engine_phases(cfg, needs_teacher, with_eval=bool(cfg.data.val_files)))
