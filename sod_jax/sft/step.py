"""Cold-start SFT: the compiled step and the step plan.

One optimizer step takes ``sft.batch_size`` conversations, packed into rows of ``pack_length``
tokens (:mod:`sod_jax.sft.packing`) and grouped into micro-batches of R rows: the step's input is
``[A, R, L]``. ONE jitted function (state donated) scans over the A micro-batches, accumulating
the gradient of the summed token NLL (chunked log-probs: never ``[R, L, V]``), divides by the
number of loss tokens of the whole step (the loss is the token mean over the global batch), clips
the global norm and applies AdamW with linear warmup and cosine decay (the optimizer of
:mod:`sod_jax.optim`; a step whose loss or gradient is not finite is skipped, as in RL: params and
optimizer state untouched, ``skipped`` reported). A is the largest number of
micro-batches any step of the plan needs, so the step compiles once; a step that needs fewer pads
with empty micro-batches, which ``lax.cond`` skips at run time.

The whole data order is planned up front from the seed (:func:`plan_steps`): step k's
conversations are a pure function of (seed, k), so a restored step counter is a complete data
position.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from sod_jax import optim, parallel
from sod_jax.models.logprobs import token_logprobs
from sod_jax.sft.packing import Example, SFTBatch, build_batch, fit_length, pack_rows, tokenize_conversation

log = logging.getLogger(__name__)


class SFTState(NamedTuple):
    """Everything the optimizer step updates (a pytree of device arrays; checkpointable as is)."""

    step: jax.Array  # int32 scalar: optimizer steps taken (also the data position)
    params: Any  # nnx.State of the model's parameters
    opt_state: Any


# ---------------------------------------------------------------------------------------------
# Examples and the step plan
# ---------------------------------------------------------------------------------------------


def prepare_examples(rows: Sequence[dict], tokenizer: Any, *, max_length: int, overlong: str = "drop",
                     enable_thinking: bool = True, progress: bool = False) -> tuple[list[Example], dict]:
    """Tokenize SFT rows (``{"messages", "tools", "index"}``) with their loss masks; drop or truncate
    the over-long ones. Returns the examples and counts (``rows``, ``kept``, ``dropped_overlong``,
    ``truncated``, ``tokens``, ``loss_tokens``)."""
    out, dropped, truncated = [], 0, 0
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="tokenize", unit="conv", leave=False)
    for pos, row in enumerate(it):
        index = int(row.get("index", pos))
        ex = tokenize_conversation(tokenizer, row["messages"], row.get("tools"), enable_thinking=enable_thinking,
                                   index=index)
        fitted = fit_length(ex, max_length, overlong)
        if fitted is None:
            dropped += 1
            continue
        truncated += int(fitted.truncated)
        if fitted.loss_mask[1:].sum() == 0:  # truncation cut every assistant token
            dropped += 1
            continue
        out.append(fitted)
    stats = dict(rows=len(rows), kept=len(out), dropped_overlong=dropped, truncated=truncated,
                 tokens=int(sum(len(e) for e in out)), loss_tokens=int(sum(int(e.loss_mask.sum()) for e in out)))
    return out, stats


@dataclass
class StepPlan:
    """Which conversations every optimizer step trains on, and how they are packed."""

    steps: list[list[list[int]]]  # per step, its packed rows, each a list of example indices
    micro_batches: int  # A: micro-batches per step (the most any step needs)
    rows_per_micro: int  # R
    pack_length: int  # L
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return len(self.steps)


def plan_steps(lengths: Sequence[int], *, batch_size: int, epochs: int, pack_length: int, rows_per_micro: int,
               seed: int = 0, shuffle: bool = True, max_steps: int = 0) -> StepPlan:
    """Epoch-wise (shuffled by ``seed`` and the epoch) batches of ``batch_size`` conversations, each
    packed into rows; the last batch of an epoch may be smaller."""
    n = len(lengths)
    if n == 0:
        raise ValueError("no training conversations")
    per_epoch = math.ceil(n / batch_size)
    steps = []
    for epoch in range(epochs):
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)).tolist()
        for b in range(per_epoch):
            if max_steps and len(steps) >= max_steps:
                break
            members = order[b * batch_size:(b + 1) * batch_size]
            rows = pack_rows([lengths[i] for i in members], pack_length)
            steps.append([[members[j] for j in row] for row in rows])
    a = max(math.ceil(len(rows) / rows_per_micro) for rows in steps)
    return StepPlan(steps, a, rows_per_micro, pack_length, per_epoch)


def eval_batches(examples: Sequence[Example], pack_length: int, rows_per_micro: int) -> list[SFTBatch]:
    """Held-out conversations packed once into micro-batches ``[1, R, L]`` (the eval step's shape)."""
    rows = pack_rows([len(e) for e in examples], pack_length)
    out = []
    for i in range(0, len(rows), rows_per_micro):
        out.append(build_batch(examples, rows[i:i + rows_per_micro], 1, rows_per_micro, pack_length))
    return out


# ---------------------------------------------------------------------------------------------
# The compiled step (the optimizer is :mod:`sod_jax.optim`)
# ---------------------------------------------------------------------------------------------


def packed_nll(graphdef: Any, params: Any, input_ids, positions, segment_ids, loss_mask, chunk: int):
    """Summed NLL of the loss tokens and their count for packed rows ``[R, L]``.

    ``loss_mask[r, t]`` marks target tokens: the loss has ``-log p(ids[r, t] | ids[r, :t] of the same
    segment)``. Attention is restricted to the segment; log-probs come in chunks of ``chunk`` tokens."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(input_ids, positions=positions, attention_mask=(segment_ids > 0).astype(jnp.int32),
                                 segment_ids=segment_ids)  # [R, L, D]
    lp = token_logprobs(hidden[:, :-1], model.lm_head_weight(), input_ids[:, 1:], chunk=chunk)  # [R, L-1]
    m = loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(lp * m), jnp.sum(m)


def build_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, chunk: int,
                     mesh: Optional[Mesh] = None, state_shardings: Any = None) -> Callable:
    """``step(state, batch: SFTBatch [A, R, L]) -> (state, metrics)``, jitted, ``state`` donated.

    ``tx`` and ``schedule`` come from :func:`sod_jax.optim.make_optimizer`; the update is
    :func:`sod_jax.optim.apply_if_finite`. metrics: ``loss`` (token-mean NLL over the step's loss
    tokens), ``grad_norm`` (before clipping), ``lr`` (``schedule(state.step)``), ``loss_tokens``,
    ``skipped`` (1 when the loss or gradient norm was not finite: the update is skipped, params and
    optimizer state are left as they were). ``state.step`` counts every step, skipped or not: it is
    the data position."""

    def _step(state: SFTState, batch: SFTBatch):
        params = state.params
        n_tok = jnp.sum(batch.loss_mask[:, :, 1:].astype(jnp.float32))
        zeros = jax.tree.map(jnp.zeros_like, params)

        def micro(carry, mb):
            g_acc, nll_acc = carry

            def compute(_):
                (nll, _), g = jax.value_and_grad(
                    lambda p: packed_nll(graphdef, p, *mb, chunk), has_aux=True)(params)
                return nll, g

            def skip(_):
                return jnp.zeros((), jnp.float32), zeros

            nll, g = jax.lax.cond(jnp.any(mb[3] > 0), compute, skip, None)
            return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll), None

        xs = (batch.input_ids, batch.positions, batch.segment_ids, batch.loss_mask)
        (g_sum, nll_sum), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), xs)
        denom = jnp.maximum(n_tok, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = nll_sum / denom
        new_params, new_opt, gnorm, ok = optim.apply_if_finite(tx, grads, loss, params, state.opt_state)
        new_state = SFTState(state.step + 1, new_params, new_opt)
        metrics = dict(loss=loss, grad_norm=gnorm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                       loss_tokens=n_tok, skipped=(~ok).astype(jnp.int32))
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return _under_mesh(jax.jit(_step, donate_argnums=(0,), out_shardings=out_shardings), mesh)


def _under_mesh(jitted: Callable, mesh: Optional[Mesh]) -> Callable:
    """Call ``jitted`` (and its ``.lower``) with ``mesh`` as JAX's current mesh, so the activation
    constraints traced inside follow the mesh (the context cannot be entered while tracing)."""

    def wrap(fn):
        def call(*args):
            ctx = parallel.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
            with ctx:
                return fn(*args)
        return call

    out = wrap(jitted)
    out.lower = wrap(jitted.lower)
    out._cache_size = jitted._cache_size
    return out


def build_eval_step(graphdef: Any, chunk: int, mesh: Optional[Mesh] = None) -> Callable:
    """``eval_step(params, batch: SFTBatch [1, R, L]) -> (nll_sum, loss_tokens)``, jitted."""

    def ev(params, batch: SFTBatch):
        return packed_nll(graphdef, params, batch.input_ids[0], batch.positions[0], batch.segment_ids[0],
                          batch.loss_mask[0], chunk)

    return _under_mesh(jax.jit(ev), mesh)


__all__ = ["SFTState", "StepPlan", "build_eval_step", "build_train_step", "eval_batches", "packed_nll", "plan_steps",
           "prepare_examples"]
