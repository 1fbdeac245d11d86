"""The engine's sampling copy is laid out by the declared SAMPLING_RULES (the params' logical axes),
and that layout is exactly the training layout without fsdp (what the engine computed before by
editing partition specs)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sod_jax import parallel
from sod_jax.models import Qwen3Config, init_model
from sod_jax.rollout import Engine, Request, SamplingParams, generate

CFG = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def test_sampling_rules_are_the_training_rules_without_fsdp_for_params():
    train, sample = dict(parallel.DEFAULT_RULES), dict(parallel.SAMPLING_RULES)
    assert set(train) == set(sample)
    assert sample["batch"] == train["batch"]
    for name, target in sample.items():
        if name == "batch":
            continue
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        assert "fsdp" not in mesh_axes, name
        want = () if train[name] is None else ((train[name],) if isinstance(train[name], str) else tuple(train[name]))
        assert mesh_axes == tuple(a for a in want if a != "fsdp"), name


def _without_fsdp(sharding, layer_slice):
    """The engine's former rule: the trainer array's spec with fsdp removed (and the layers axis dropped
    for a layer's slice)."""
    def keep(entry):
        if entry is None:
            return None
        names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n != "fsdp")
        return names if len(names) > 1 else (names[0] if names else None)

    spec = [keep(e) for e in sharding.spec]
    return NamedSharding(sharding.mesh, P(*(spec[1:] if layer_slice else spec)))


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (1, 2, 4), (1, 8, 1), (8, 1, 1)])
def test_sampling_copy_is_the_training_layout_without_fsdp(shape):
    mesh = parallel.make_mesh(*shape)
    model = parallel.shard_module(init_model(CFG, seed=1), mesh)
    w = model.weights()
    engine = Engine(model, num_slots=2, max_len=32, decode_steps=4, prefill_buckets=(8,))
    got = engine.params
    for k in ("embed", "final_norm", "lm_head"):
        want = _without_fsdp(w[k].sharding, False)
        assert got[k].sharding.mesh == mesh and got[k].sharding.spec == want.spec, (k, got[k].sharding.spec, want.spec)
    for layer in got["layers"]:
        for n, a in layer.items():
            want = _without_fsdp(w["layers"][n].sharding, True)
            assert a.sharding.spec == want.spec, (n, a.sharding.spec, want.spec)
            assert a.shape == w["layers"][n].shape[1:]
    # The shard shapes a decode step reads: fsdp never splits a weight.
    q = got["layers"][0]["q"]
    assert q.sharding.shard_shape(q.shape)[0] == CFG.hidden_size


def test_sampling_on_a_mesh_equals_one_device():
    assert jax.device_count() >= 8  # conftest's host devices
    ps = [[5, 6, 7], [9, 3, 4, 2, 8]]
    reqs = lambda: [Request(p, max_new_tokens=6, sampling=SamplingParams(greedy=True), id=i)
                    for i, p in enumerate(ps)]
    single = generate(Engine(init_model(CFG, seed=2), num_slots=2, max_len=32, decode_steps=4,
                             prefill_buckets=(8,)), reqs())
    mesh = parallel.make_mesh(1, 4, 2)
    sharded = generate(Engine(parallel.shard_module(init_model(CFG, seed=2), mesh), num_slots=2, max_len=32,
                              decode_steps=4, prefill_buckets=(8,)), reqs())
    assert [o.token_ids for o in sharded] == [o.token_ids for o in single]
    np.testing.assert_allclose([o.logprobs for o in sharded], [o.logprobs for o in single], atol=1e-5)
