"""The one optimizer of the RL and SFT loops: schedule, global-norm clip, AdamW, the non-finite skip,
and the optimizer state's shardings and initial value.

Both loops describe their optimizer as an :class:`OptimizerSpec` (:meth:`OptimizerSpec.from_rl`,
:meth:`OptimizerSpec.from_sft` read the two config sections), build it with :func:`make_optimizer`
and apply a step's gradient with :func:`apply_if_finite`: the global gradient norm is computed once
(metric, finiteness test and clip), and a step whose loss or gradient norm is not finite leaves the
parameters and the optimizer state untouched (``lax.cond``) and reports ``ok = False``, which the
caller counts and reports.

Learning rates are indexed by the optimizer's own update count (``0`` for the first update); a
skipped update does not advance it. Placing batches on the mesh is :func:`sod_jax.parallel.place_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@dataclass(frozen=True)
class OptimizerSpec:
    """What defines the optimizer: a learning-rate schedule over ``total_steps`` optimizer updates,
    global-norm clipping at ``grad_clip``, then AdamW.

    Schedules (``schedule``): ``constant`` (linear warmup from 0 over ``warmup_steps`` updates, then
    ``lr``) or ``cosine`` (the same warmup, then cosine decay from ``lr`` to ``end_lr``, reached at
    update ``total_steps``, warmup included). ``schedule_key`` and ``warmup_key`` are the config keys
    the values came from; errors name them.
    """

    lr: float
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    total_steps: int = 0  # the run's optimizer updates: the cosine horizon
    end_lr: float = 0.0  # where cosine ends
    grad_clip: float = 1.0  # max global norm of the gradient
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0  # decoupled (AdamW), on every parameter
    schedule_key: str = "optim.schedule"
    warmup_key: str = "optim.warmup_steps"

    @classmethod
    def from_rl(cls, optim_cfg: Any, total_optimizer_steps: int) -> "OptimizerSpec":
        """From a :class:`sod_jax.config.OptimConfig` (``cfg.optim``). ``total_optimizer_steps`` is
        the run's number of optimizer updates (:func:`sod_jax.rl.update.num_optimizer_steps`); cosine
        decays to 0 over it, and it must exceed ``optim.warmup_steps``."""
        o = optim_cfg
        return cls(lr=o.lr, schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=total_optimizer_steps,
                   end_lr=0.0, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                   schedule_key="optim.schedule", warmup_key="optim.warmup_steps")

    @classmethod
    def from_sft(cls, sft_cfg: Any, total_steps: int) -> "OptimizerSpec":
        """From a :class:`sod_jax.config.SFTConfig` (``cfg.sft``) for a run of ``total_steps``
        optimizer steps: ``round(warmup_ratio * total_steps)`` warmup steps, cosine to
        ``lr * min_lr_ratio``. The cosine horizon is at least one step past the warmup (a warmup
        ratio of 1 ends the run at the peak instead of failing)."""
        s = sft_cfg
        warmup = int(round(s.warmup_ratio * total_steps))
        return cls(lr=s.lr, schedule=s.schedule, warmup_steps=warmup,
                   total_steps=max(total_steps, warmup + 1) if s.schedule == "cosine" else total_steps,
                   end_lr=s.lr * s.min_lr_ratio, grad_clip=s.grad_clip, b1=s.b1, b2=s.b2,
                   weight_decay=s.weight_decay, schedule_key="sft.schedule",
                   warmup_key="round(sft.warmup_ratio * steps)")


def make_schedule(spec: OptimizerSpec) -> optax.Schedule:
    """The learning rate of update ``count`` (a scalar) as a function."""
    if spec.schedule == "cosine":
        if spec.total_steps <= spec.warmup_steps:
            raise ValueError(f"{spec.schedule_key}=cosine: the run has {spec.total_steps} optimizer steps, not more "
                             f"than {spec.warmup_key}={spec.warmup_steps}; lower the warmup or train longer")
        return optax.warmup_cosine_decay_schedule(0.0, spec.lr, spec.warmup_steps, spec.total_steps,
                                                  end_value=spec.end_lr)
    if spec.schedule != "constant":
        raise ValueError(f"{spec.schedule_key}={spec.schedule!r}: unknown schedule; use constant or cosine")
    if spec.warmup_steps:
        return optax.linear_schedule(0.0, spec.lr, spec.warmup_steps)
    return optax.constant_schedule(spec.lr)


def clip_by_given_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` that reuses a norm the caller already computed
    (``tx.update(grads, state, params, global_norm=g)``); computes it when none is passed."""

    def update_fn(updates, state, params=None, *, global_norm=None, **_):
        del params
        g = optax.tree.norm(updates) if global_norm is None else global_norm
        trigger = g < max_norm
        updates = jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g.astype(t.dtype)) * max_norm), updates)
        return updates, state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(spec: OptimizerSpec) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: global-norm clip (by the norm :func:`apply_if_finite` passes), then AdamW
    with the learning rate of :func:`make_schedule`.

    A constant rate without warmup enters AdamW as a number, so the optimizer state holds no
    schedule counter (the state a checkpoint saves: clip, Adam moments and count, nothing else).
    """
    schedule = make_schedule(spec)
    lr = spec.lr if spec.schedule == "constant" and not spec.warmup_steps else schedule
    tx = optax.chain(clip_by_given_global_norm(spec.grad_clip),
                     optax.adamw(lr, b1=spec.b1, b2=spec.b2, weight_decay=spec.weight_decay))
    return tx, schedule


def apply_if_finite(tx: optax.GradientTransformation, grads: Any, loss: jax.Array, params: Any,
                    opt_state: Any) -> tuple[Any, Any, jax.Array, jax.Array]:
    """One optimizer update, or none when the step is not finite (the one non-finite rule).

    ``grads`` and ``params`` are trees of the same structure, ``loss`` a scalar. Returns
    ``(params, opt_state, grad_norm, ok)``: ``grad_norm`` (scalar float32) is the global norm of
    ``grads`` before clipping, passed to the clip of :func:`make_optimizer` as ``global_norm``;
    ``ok`` (scalar bool) is ``isfinite(grad_norm) & isfinite(loss)``. When ``ok`` is False the
    update is not applied: ``params`` and ``opt_state`` come back as they were (bit for bit) and
    the optimizer's update count does not advance. Traceable (use inside ``jit``/``scan``).
    """
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(gnorm) & jnp.isfinite(loss)
    tx = optax.with_extra_args_support(tx)

    def apply(args):
        p, s = args
        updates, s = tx.update(grads, s, p, global_norm=gnorm)
        return optax.apply_updates(p, updates), s

    params, opt_state = jax.lax.cond(ok, apply, lambda args: args, (params, opt_state))
    return params, opt_state, gnorm, ok


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Any) -> Any:
    """Shardings of ``tx``'s state for ``params``: every per-parameter leaf (Adam moments) like its
    parameter in ``param_shardings`` (a tree of shardings matching ``params``), everything else
    (counters) replicated over ``mesh``."""
    state_shape = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, state_shape, param_shardings,
                                 transform_non_params=lambda _: replicated)


def init_opt_state(tx: optax.GradientTransformation, params: Any, shardings: Optional[Any] = None) -> Any:
    """``tx``'s initial state for ``params``, created on the devices directly: placed on
    ``shardings`` (:func:`opt_state_shardings`) when given."""
    return jax.jit(tx.init, out_shardings=shardings)(params)


__all__ = ["OptimizerSpec", "apply_if_finite", "clip_by_given_global_norm", "init_opt_state", "make_optimizer",
           "make_schedule", "opt_state_shardings"]
