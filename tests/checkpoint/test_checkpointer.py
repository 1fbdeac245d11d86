"""Checkpointer: round trip of a TrainState-like tree, keep-last-N, fallback over a damaged latest
step, and restore onto other meshes (8 fake devices -> 4 -> 1)."""

import functools
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sod_jax import parallel
from sod_jax.checkpoint import Checkpointer, CheckpointWarning, abstract_like
from sod_jax.models.qwen3 import Qwen3Config, init_model
from sod_jax.optim import opt_state_shardings

TINY = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


class State(NamedTuple):  # the shape of sod_jax.rl.update.TrainState; the module must not care
    step: Any
    params: Any
    opt_state: Any
    rng: Any


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))


@functools.lru_cache(maxsize=None)
@jax.jit
def _base_state() -> State:
    params = nnx.state(init_model(TINY, seed=0), nnx.Param)
    opt_state = TX.init(params)
    # one real update so the moments are non-zero
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = TX.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return State(jnp.int32(1), params, opt_state, jax.random.key_data(jax.random.PRNGKey(0)))


@jax.jit
def _shift(base: State, seed: jax.Array) -> State:
    return jax.tree.map(lambda x: x + seed.astype(x.dtype), base)


def _state(seed: int = 0, mesh: Any = None) -> State:
    """A distinct TrainState-like tree per seed (nnx params, real AdamW state, step, rng key data);
    with ``mesh``, every leaf is placed as the trainer would (params by logical axes, moments alike,
    scalars replicated)."""
    st = _shift(_base_state(), jnp.int32(seed))
    if mesh is None:
        return st
    param_sh = parallel.param_shardings(st.params, mesh)
    rep = NamedSharding(mesh, P())
    return State(jax.device_put(st.step, rep), jax.device_put(st.params, param_sh),
                 jax.device_put(st.opt_state, opt_state_shardings(TX, st.params, param_sh, mesh)),
                 jax.device_put(st.rng, rep))


def _leaves_equal(a: Any, b: Any) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and len(la) > 10
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_extra_and_keep(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=2, keep=2)
    assert ckpt.restore(abstract_like(_state())) is None  # empty directory
    saved = {}
    for step in range(1, 7):
        st = _state(step)
        did = ckpt.save(step, st, extra={"loader": {"epoch": 0, "pos": step}, "history": [1.5] * step})
        assert did == (step % 2 == 0)
        if did:
            saved[step] = st
            assert isinstance(ckpt.last_save_blocking_s, float) and ckpt.last_save_blocking_s >= 0
    assert ckpt.save(7, _state(7), extra={}, force=True)  # the end-of-run save
    assert ckpt.save(7, _state(7), force=True) is False  # an existing step is not written again
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]  # keep=2
    step, st, extra = ckpt.restore(abstract_like(_state()), step=6)
    assert step == 6 and extra == {"loader": {"epoch": 0, "pos": 6}, "history": [1.5] * 6}
    assert type(st) is State and type(st.opt_state) is type(saved[6].opt_state)
    _leaves_equal(st, saved[6])
    assert ckpt.restore(abstract_like(_state()))[0] == 7
    assert ckpt.restore_extra() == (7, {})
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="step 3 not found.*available: \\[6, 7\\]"):
        Checkpointer(tmp_path / "ck", save_every=2, keep=2).restore(abstract_like(_state()), step=3)


def test_typed_key_is_refused_with_advice(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    with pytest.raises(TypeError, match="key_data"):
        ckpt.save(1, {"rng": jax.random.key(0)})
    ckpt.close()


def _damage(step_dir):
    """Truncate the largest array data file of a finalized step (a disk-full or killed copy)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 3)


def test_truncated_latest_falls_back_to_previous(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
    states = {s: _state(s) for s in (1, 2, 3)}
    for s, st in states.items():
        ckpt.save(s, st, extra={"step": s})
    ckpt.wait()
    _damage(tmp_path / "3")
    with pytest.warns(CheckpointWarning, match=r"step 3 .*restored step 2 instead"):
        step, st, extra = Checkpointer(tmp_path, save_every=1, keep=3).restore(abstract_like(_state()))
    assert step == 2 and extra == {"step": 2}
    _leaves_equal(st, states[2])
    # the damaged step is moved aside (kept for inspection) and its number is free for the next save
    assert (tmp_path / "3.unreadable").is_dir() and not (tmp_path / "3").exists()
    again = Checkpointer(tmp_path, save_every=1, keep=3)
    assert again.all_steps() == [1, 2]
    assert again.save(3, states[3], extra={"step": 3})
    again.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert again.restore(abstract_like(_state()))[0] == 3
    again.close()


def test_missing_extra_file_falls_back(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
    for s in (1, 2):
        ckpt.save(s, _state(s), extra={"step": s})
    ckpt.close()
    for f in (tmp_path / "2" / "extra").iterdir():
        if f.name != "commit_success.txt":
            f.unlink()
    with pytest.warns(CheckpointWarning, match=r"step 2 .*restored step 1 instead"):
        assert Checkpointer(tmp_path, save_every=1, keep=3).restore(abstract_like(_state()))[0] == 1


def test_sharded_save_restores_on_4_and_1_devices(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    st8 = _state(3, mesh=parallel.make_mesh(data=1, fsdp=4, tensor=2))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(st8.params))
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    ckpt.save(5, st8, extra={})
    ckpt.close()

    for devices in (jax.devices()[:4], jax.devices()[5:6]):
        mesh = parallel.make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
        target = abstract_like(_state(0, mesh=mesh))
        step, st, _ = Checkpointer(tmp_path, save_every=1, keep=1).restore(target)
        assert step == 5
        _leaves_equal(st, st8)
        for got, want in zip(jax.tree.leaves(st), jax.tree.leaves(target)):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
            assert got.sharding.device_set == set(devices)


@pytest.mark.parametrize("override, key", [("checkpoint.keep=0", "checkpoint.keep"),
                                           ("checkpoint.save_every=0", "checkpoint.save_every")])
def test_bad_checkpoint_config_names_the_key(override, key):
    from sod_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"{key} must be >= 1"):
        load_config(None, [override], job="sft")
