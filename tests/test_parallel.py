"""Sharded params on 8 fake CPU devices give the unsharded logits; weights follow their logical axes."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from flax import nnx
from jax.sharding import PartitionSpec as P

from sod_jax import parallel
from sod_jax.models import load_pretrained
from sod_jax.models.qwen3 import LAYER_AXES

# Every sharded dimension divides its mesh axes: 8 heads / 4 kv heads / mlp 128 / vocab 256 over
# tensor=2; hidden 64 over fsdp 2 or 4.
SHARDABLE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
                 rope_theta=10000.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("shardable")
    make_hf_model(seed=3, **SHARDABLE).save_pretrained(d)
    return d


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_logits_equal_unsharded(ckpt, shape):
    ids = np.random.RandomState(0).randint(0, 256, (4, 9))
    mask = np.ones((4, 9), np.int32)
    mask[1, :3] = 0
    ref = np.asarray(load_pretrained(ckpt)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    mesh = parallel.make_mesh(**shape)
    model = load_pretrained(ckpt, mesh=mesh)
    # Each weight is sharded as its logical axes say, and not trivially replicated.
    for keys, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata()["logical_axes"]
        expected = parallel.logical_to_spec(axes, var.shape, mesh)
        assert var[...].sharding.spec == expected, (keys, var[...].sharding.spec, expected)
    spec = lambda name: getattr(model.layers, name)[...].sharding.spec  # noqa: E731
    assert spec("q") == P(None, "fsdp", "tensor", None)
    assert spec("down") == P(None, "tensor", "fsdp")
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
    assert spec("q_norm") == P(None, None)
    # A device holds only its shard.
    q = model.layers.q[...]
    assert q.addressable_shards[0].data.shape == (2, 64 // shape["fsdp"], 4, 16)

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    ids_g, mask_g = parallel.put_batch((jnp.asarray(ids), jnp.asarray(mask)), mesh)
    assert ids_g.sharding.spec == P(("data", "fsdp"), None) if shape["data"] > 1 else P("fsdp", None)
    with parallel.use_mesh(mesh):
        out = np.asarray(forward(state, ids_g, mask_g))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_sharded_blocked_attention_equals_dense(ckpt):
    """Blocked attention (blocks of 4 over 9 tokens) with params and batch sharded fsdp=4 x tensor=2:
    logits and parameter gradients equal the unsharded dense model's."""
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (4, 9)))
    mask = np.ones((4, 9), np.int32)
    mask[2, 6:] = 0
    mask = jnp.asarray(mask)
    real = (mask[:, :, None] > 0).astype(jnp.float32)

    def loss_and_grads(model, ids, mask, mesh=None):
        graphdef, state = nnx.split(model)

        @jax.jit
        def f(state, ids, mask):
            def loss(state):
                logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)
                return jnp.sum(jnp.tanh(logits) * real), logits
            return jax.value_and_grad(loss, has_aux=True)(state)

        with parallel.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            (_, logits), grads = f(state, ids, mask)
        return np.asarray(logits) * np.asarray(real), grads

    ref_logits, ref_grads = loss_and_grads(load_pretrained(ckpt, attention_block=0), ids, mask)
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    model = load_pretrained(ckpt, mesh=mesh, attention_block=4)
    ids_g, mask_g = parallel.put_batch((ids, mask), mesh)
    logits, grads = loss_and_grads(model, ids_g, mask_g, mesh)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):  # grads reach |30|: fp32 sum order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_shard_module_moves_an_initialised_model():
    from sod_jax.models import init_model, preset

    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    model = init_model(preset("bench-student", num_hidden_layers=1))
    parallel.shard_module(model, mesh)
    assert model.layers.gate[...].sharding.spec == P(None, "fsdp", "tensor")


def test_indivisible_dims_fall_back_to_replication():
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    # 1 kv head cannot be split over tensor=2; embed 6 not over fsdp=4.
    assert parallel.logical_to_spec(LAYER_AXES["k"], (2, 64, 1, 16), mesh) == P(None, "fsdp", None, None)
    assert parallel.logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P(None, "tensor")
    # batch over data x fsdp, collapsing size-1 axes
    assert parallel.logical_to_spec(("batch", None), (8, 3), mesh) == P("fsdp", None)


def test_mesh_shape_errors_are_explained():
    with pytest.raises(ValueError, match="3 .*divide"):
        parallel.make_mesh(data=3, fsdp=-1, tensor=1)
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor = 4 but 8 devices"):
        parallel.make_mesh(data=2, fsdp=2, tensor=1)
    assert parallel.make_mesh(data=2, fsdp=-1, tensor=2).shape == {"data": 2, "fsdp": 2, "tensor": 2}


def test_constraints_follow_the_mesh_of_each_call_not_of_the_first_trace():
    """One jitted function, first called without a mesh, then under one: the second call is traced
    again with its constraints (JAX's mesh context is part of the cache key), and vice versa."""
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    f = jax.jit(lambda x: parallel.constrain(x * 2, ("batch", None)))
    x = jnp.ones((8, 4))
    assert "sharding_constraint" not in f.lower(x).as_text()
    with parallel.use_mesh(mesh):
        assert "sharding_constraint" in f.lower(x).as_text()
        assert f(x).sharding.spec[0] == "fsdp"
    f(x)  # back outside: unconstrained again
    assert "sharding_constraint" not in f.lower(x).as_text()


def test_put_batch_process_local_rows_make_the_global_batch():
    """Per-process data: each process passes its own rows; with one process the local rows are the
    whole batch, placed with the same sharding as the single-process path."""
    mesh = parallel.make_mesh(data=2, fsdp=4, tensor=1)
    x = np.arange(16 * 3).reshape(16, 3)
    local = parallel.put_batch(x, mesh, process_local=True)
    whole = parallel.put_batch(x, mesh)
    assert local.shape == (16, 3) and local.sharding.spec == whole.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(local), x)


def test_host_local_sampling_mesh_and_its_refusal():
    """Each process samples on its own block of the mesh; a tensor axis split across processes is
    refused with a message naming mesh.tensor (checked on a stand-in mesh of 2 hosts x 2 devices)."""
    from types import SimpleNamespace

    import numpy as np

    from sod_jax.parallel import LocalMeshError, local_mesh, make_mesh

    mesh = make_mesh(1, 4, 2)
    assert local_mesh(mesh) is mesh  # one process: the whole mesh

    def stand_in(procs):  # devices of a (data=1, fsdp=2, tensor=2) mesh with the given process of each
        devs = np.array([SimpleNamespace(process_index=p) for p in procs], dtype=object).reshape(1, 2, 2)
        return SimpleNamespace(devices=devs, shape={"data": 1, "fsdp": 2, "tensor": 2},
                               axis_names=("data", "fsdp", "tensor"))

    with pytest.raises(LocalMeshError, match="mesh.tensor=2 spans processes"):
        local_mesh(stand_in([0, 1, 0, 1]), process_index=0)  # each tensor pair split over the 2 hosts
    with pytest.raises(LocalMeshError, match="not a contiguous block"):
        local_mesh(stand_in([0, 1, 1, 0]), process_index=0)
