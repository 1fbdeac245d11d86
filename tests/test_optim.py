"""The one optimizer of both loops (:mod:`sod_jax.optim`): both config sections give the schedules
and optimizers the RL and SFT code built before (written out here with optax), the cosine error
names its keys, the non-finite rule (skip, report), the SFT step under that rule, and that the RL and
SFT loops obtain their optimizer from the factory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sod_jax import optim, parallel
from sod_jax.config import OptimConfig, load_config
from sod_jax.models import Qwen3Config, init_model
from sod_jax.rl.update import make_train_state
from sod_jax.sft.packing import Example, build_batch
from sod_jax.sft.step import SFTState, build_train_step
from sod_jax.sft.trainer import SFTTrainer

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, dtype="float32", param_dtype="float32",
            remat="none")


# ---------------------------------------------------------------------------------------------
# The formulas the two loops used before the factory, written out with optax
# ---------------------------------------------------------------------------------------------


def old_rl_lr(o: OptimConfig, total: int):
    """RL: the learning rate handed to AdamW (a number for constant without warmup)."""
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, total)
    if o.warmup_steps:
        return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return o.lr


def old_sft_schedule(s, total: int):
    warmup = int(round(s.warmup_ratio * total))
    if s.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(total, warmup + 1),
                                                  end_value=s.lr * s.min_lr_ratio)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, s.lr, warmup), optax.constant_schedule(s.lr)],
                                    [warmup])
    return optax.constant_schedule(s.lr)


def old_tx(lr, clip, b1, b2, wd):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd))


def run_updates(tx, n: int):
    """``n`` updates of a small tree by random gradients (some above the clip): the updates."""
    rng = np.random.RandomState(0)
    params = {"a": jnp.asarray(rng.randn(3, 4), jnp.float32), "b": jnp.asarray(rng.randn(5), jnp.float32)}
    state, out = tx.init(params), []
    for k in range(n):
        scale = 3.0 if k % 2 else 0.05  # alternately clipped and not
        g = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape) * scale, jnp.float32), params)
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
        out.append(jax.device_get(upd))
    return out


RL_CASES = [dict(lr=1e-3), dict(lr=2e-3, warmup_steps=4), dict(lr=1e-3, schedule="cosine", warmup_steps=3),
            dict(lr=5e-4, schedule="cosine", warmup_steps=0, b1=0.8, b2=0.99, weight_decay=0.1, grad_clip=0.5)]


@pytest.mark.parametrize("kw", RL_CASES)
def test_rl_schedule_and_optimizer_are_the_old_ones(kw):
    o, total = OptimConfig(**kw), 12
    spec = optim.OptimizerSpec.from_rl(o, total)
    sched, old = optim.make_schedule(spec), old_rl_lr(o, total)
    for c in range(total + 4):
        want = old(c) if callable(old) else old
        assert float(sched(c)) == float(want), c
    tx, tx_sched = optim.make_optimizer(spec)
    assert [float(tx_sched(c)) for c in range(total)] == [float(sched(c)) for c in range(total)]
    ref = old_tx(old, o.grad_clip, o.b1, o.b2, o.weight_decay)
    # same state layout (what a checkpoint holds) and the same updates, bit for bit
    params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(ref.init(params))
    for got, want in zip(run_updates(tx, total), run_updates(ref, total)):
        jax.tree.map(np.testing.assert_array_equal, got, want)


SFT_CASES = [dict(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1), dict(lr=1e-3, warmup_ratio=0.0, min_lr_ratio=0.0),
             dict(lr=1e-3, warmup_ratio=0.25, min_lr_ratio=0.3), dict(lr=1e-3, warmup_ratio=1.0, min_lr_ratio=0.1),
             dict(lr=1e-3, warmup_ratio=0.2, schedule="constant"), dict(lr=1e-3, warmup_ratio=0.0, schedule="constant"),
             dict(lr=2e-3, warmup_ratio=0.1, b1=0.8, b2=0.9, weight_decay=0.0, grad_clip=0.3)]


@pytest.mark.parametrize("kw", SFT_CASES)
@pytest.mark.parametrize("total", [1, 7, 40])
def test_sft_schedule_and_optimizer_are_the_old_ones(kw, total):
    s = dataclasses.replace(load_config(job="sft").sft, **kw)
    spec = optim.OptimizerSpec.from_sft(s, total)
    sched, old = optim.make_schedule(spec), old_sft_schedule(s, total)
    for c in range(total + 4):
        assert float(sched(c)) == float(old(c)), c
    tx, tx_sched = optim.make_optimizer(spec)
    assert [float(tx_sched(c)) for c in range(total)] == [float(old(c)) for c in range(total)]
    ref = old_tx(old, s.grad_clip, s.b1, s.b2, s.weight_decay)
    for got, want in zip(run_updates(tx, total + 2), run_updates(ref, total + 2)):
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_cosine_with_too_few_steps_names_the_keys():
    o = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=5)
    for total in (5, 3):
        with pytest.raises(ValueError, match=r"optim\.schedule=cosine: .* optim\.warmup_steps=5"):
            optim.make_optimizer(optim.OptimizerSpec.from_rl(o, total))
    optim.make_optimizer(optim.OptimizerSpec.from_rl(o, 6))
    with pytest.raises(ValueError, match=r"sft\.schedule='linear'"):
        optim.make_schedule(optim.OptimizerSpec(lr=1.0, schedule="linear", schedule_key="sft.schedule"))


# ---------------------------------------------------------------------------------------------
# The non-finite rule
# ---------------------------------------------------------------------------------------------


def _tree(seed):
    rng = np.random.RandomState(seed)
    return {"w": jnp.asarray(rng.randn(4, 3), jnp.float32), "b": jnp.asarray(rng.randn(3), jnp.float32)}


def test_apply_if_finite_skips_a_non_finite_step_and_otherwise_is_the_plain_update():
    tx, _ = optim.make_optimizer(optim.OptimizerSpec(lr=1e-2, schedule="cosine", warmup_steps=2, total_steps=10,
                                                     grad_clip=1.0, weight_decay=0.01))
    params = _tree(0)
    opt_state = tx.init(params)
    upd, opt_state = tx.update(_tree(1), opt_state, params)  # non-trivial moments and counters
    params = optax.apply_updates(params, upd)
    step = jax.jit(optim.apply_if_finite, static_argnums=0)

    bad = {"w": _tree(2)["w"].at[1, 2].set(jnp.nan), "b": _tree(2)["b"]}
    for grads, loss in ((bad, jnp.float32(0.5)), (_tree(2), jnp.float32(jnp.inf))):
        p, s, gnorm, ok = step(tx, grads, loss, params, opt_state)
        assert not bool(ok)
        jax.tree.map(np.testing.assert_array_equal, p, params)
        jax.tree.map(np.testing.assert_array_equal, s, opt_state)

    grads = jax.tree.map(lambda x: 3.0 * x, _tree(2))  # above the clip
    p, s, gnorm, ok = step(tx, grads, jnp.float32(0.5), params, opt_state)
    upd, want_s = tx.update(grads, opt_state, params)
    want_p = optax.apply_updates(params, upd)
    assert bool(ok) and float(gnorm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6) and float(gnorm) > 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p, want_p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s, want_s)
    # any optax transformation (no global_norm argument of its own) works too
    sgd = optax.sgd(0.1)
    p, _, _, ok = optim.apply_if_finite(sgd, grads, jnp.float32(0.5), params, sgd.init(params))
    assert bool(ok)
    jax.tree.map(lambda a, b, g: np.testing.assert_allclose(a, b - 0.1 * g, rtol=1e-6), p, params, grads)


def _sft_batch(vocab: int, rows: int = 2, length: int = 24):
    rng = np.random.RandomState(7)
    exs = []
    for i in range(rows):
        n = length - 3 * i
        mask = np.zeros(n, np.int8)
        mask[n // 2:] = 1
        exs.append(Example(ids=rng.randint(3, vocab, n).astype(np.int32), loss_mask=mask, index=i))
    batch = build_batch(exs, [[i] for i in range(rows)], 1, rows, length)
    return type(batch)(*(jnp.asarray(a) for a in batch))


def test_sft_step_skips_a_non_finite_step_and_reports_it():
    """The SFT step follows the RL rule: a non-finite loss leaves params and optimizer state as they
    were and reports ``skipped`` = 1; the data position (``state.step``) still advances; a finite
    step then updates."""
    cfg = load_config(overrides=["sft.lr=1e-2", "sft.warmup_ratio=0.0"], job="sft")
    graphdef, params = nnx.split(init_model(Qwen3Config(**TINY), seed=3))
    tx, schedule = optim.make_optimizer(optim.OptimizerSpec.from_sft(cfg.sft, 10))
    step = build_train_step(graphdef, tx, schedule, chunk=16)
    batch = _sft_batch(TINY["vocab_size"])

    clean = jax.device_get(params)
    leaves, treedef = jax.tree.flatten(clean)
    big = max(range(len(leaves)), key=lambda i: leaves[i].size)  # a weight every token goes through
    poisoned = leaves[big].copy()
    poisoned.reshape(-1)[5] = np.inf
    bad_params = jax.tree.unflatten(treedef, [poisoned if i == big else x for i, x in enumerate(leaves)])
    opt0 = jax.device_get(optim.init_opt_state(tx, bad_params))

    state, met = step(SFTState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.asarray, bad_params),
                               jax.tree.map(jnp.asarray, opt0)), batch)
    met = jax.device_get(met)
    assert not np.isfinite(met["loss"]) and int(met["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), bad_params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), opt0)
    assert int(state.step) == 1

    state, met = step(SFTState(state.step, jax.tree.map(jnp.asarray, clean), state.opt_state), batch)
    met = jax.device_get(met)
    assert np.isfinite(met["loss"]) and int(met["skipped"]) == 0 and int(state.step) == 2
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                            jax.tree.leaves(clean)))
    assert moved > 1e-4
    counts = [x for x in jax.tree.leaves(jax.device_get(state.opt_state)) if np.ndim(x) == 0]
    assert counts and all(int(c) == 1 for c in counts)  # the optimizer took exactly one update


# ---------------------------------------------------------------------------------------------
# Both loops obtain their optimizer from the factory
# ---------------------------------------------------------------------------------------------


def test_rl_and_sft_loops_take_their_optimizer_from_the_factory(monkeypatch, tmp_path):
    calls = []
    real = optim.make_optimizer

    def recording(spec):
        out = real(spec)
        calls.append((spec, out))
        return out

    monkeypatch.setattr(optim, "make_optimizer", recording)
    model_cfg = Qwen3Config(**TINY)

    # SFT: the trainer (on a mesh, as the CLI runs it)
    cfg = load_config(overrides=[f"sft.out_dir={tmp_path / 'sft'}", "sft.batch_size=2", "sft.lr=3e-4",
                                 "sft.warmup_ratio=0.5", "sft.epochs=1", "sft.max_length=64", "logging.plots=false",
                                 "model.logprob_chunk=16"], job="sft")
    mesh = parallel.make_mesh(1, -1, 1)
    model = parallel.shard_module(init_model(model_cfg, seed=0), mesh)
    rng = np.random.RandomState(1)
    mask = np.r_[np.zeros(4), np.ones(8)].astype(np.int8)
    exs = [Example(ids=rng.randint(3, 64, 12).astype(np.int32), loss_mask=mask, index=i) for i in range(4)]
    trainer = SFTTrainer(cfg, model, exs, mesh=mesh, progress=False)
    assert len(calls) == 1
    spec, (tx, schedule) = calls[0]
    assert spec.schedule_key == "sft.schedule" and spec.lr == 3e-4 and spec.warmup_steps == 1
    assert trainer.tx is tx and trainer.schedule is schedule

    # RL: the optimizer and initial state as Trainer.setup makes them
    rl_cfg = load_config(overrides=["algo.name=grpo", "optim.lr=2e-6", "optim.schedule=cosine", "optim.warmup_steps=3"])
    _, params = nnx.split(parallel.shard_module(init_model(model_cfg, seed=1), mesh))
    tx_rl, state, shardings = make_train_state(rl_cfg, params, 40, mesh)
    assert len(calls) == 2
    spec, (tx, _) = calls[1]
    assert spec.schedule_key == "optim.schedule" and spec.lr == 2e-6 and spec.total_steps == 40
    assert tx_rl is tx and int(state.step) == 0
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
    assert shardings is not None and shardings.opt_state is not None
