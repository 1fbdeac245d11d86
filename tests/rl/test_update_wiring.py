"""The update with ``iw_opd`` and the rollout importance correction: advantages, weights, loss and
mismatch metrics against plain re-computations outside the update, on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_iw_opd import loop_weights

from sod_jax import optim
from sod_jax.algo.advantages import grpo_advantages
from sod_jax.config import OptimConfig
from sod_jax.models import init_model
from sod_jax.models.qwen3 import Qwen3Config
from sod_jax.rl import update as ts

STUDENT = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
TEACHER = dataclasses.replace(STUDENT, hidden_size=48, num_hidden_layers=2, intermediate_size=96,
                              tie_word_embeddings=False)
B, L = 8, 20


@pytest.fixture(scope="module")
def models():
    s_graph, s_params = nnx.split(init_model(STUDENT, seed=0))
    t_graph, t_params = nnx.split(init_model(TEACHER, seed=1))
    return s_graph, s_params, t_graph, t_params


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    m = np.zeros((B, L), np.int32)
    m[:, 4:10] = 1  # step 1 | tool tokens | step 2
    m[:, 13:] = 1
    m[5] = 0  # a row without response tokens
    return ts.RLBatch(input_ids=jnp.asarray(rng.randint(3, 32, (B, L)), jnp.int32),
                      attention_mask=jnp.ones((B, L), jnp.int32), positions=jnp.broadcast_to(jnp.arange(L), (B, L)),
                      response_mask=jnp.asarray(m), rewards=jnp.asarray(rng.rand(B), jnp.float32),
                      group_ids=jnp.asarray(np.repeat(np.arange(2), B // 2), jnp.int32))


def logprobs(graph, params, b):
    lp, _ = jax.jit(ts.sequence_logprobs, static_argnums=(0, 5))(graph, params, b.input_ids, b.positions,
                                                                 b.attention_mask, 8)
    return lp


_UPDATES = {}  # spec -> (tx, compiled update): each spec compiles once for the module


def run(models, b, **spec_kw):
    """One update from fresh copies of the params; returns (new params, metrics). Works with the
    (params, opt_state) and the TrainState forms of the update."""
    s_graph, s_params, t_graph, t_params = models
    spec = ts.UpdateSpec(mini_batches=1, num_groups=2, logprob_chunk=16, **spec_kw)
    if spec not in _UPDATES:
        tx, _ = optim.make_optimizer(optim.OptimizerSpec.from_rl(OptimConfig(lr=1e-3), 10))
        _UPDATES[spec] = (tx, ts.build_update(spec, tx, s_graph, t_graph))
    tx, update = _UPDATES[spec]
    params = jax.tree.map(jnp.copy, s_params)
    if hasattr(ts, "TrainState"):
        state, met = update(ts.init_train_state(tx, params, seed=0), t_params, b)
        return state.params, jax.device_get(met)
    new, _, met = update(params, optim.init_opt_state(tx, params), t_params, b)
    return new, jax.device_get(met)


def test_same_model_sampler_has_no_mismatch_and_changes_nothing(models, batch):
    s_graph, s_params, _, _ = models
    b = batch._replace(sampler_logp=logprobs(s_graph, s_params, batch))  # the sampler is the same model
    p_none, met_none = run(models, b, mode="grpo")
    assert met_none["rollout_mismatch/max"] <= 1e-5 and met_none["rollout_mismatch/mean"] <= 1e-5
    assert "rollout_is/mean" not in met_none
    for level in ("token", "sequence"):
        p_is, met = run(models, b, mode="grpo", rollout_is=level)
        assert abs(met["rollout_is/mean"] - 1.0) <= 1e-4 and met["rollout_is/clipped_frac"] == 0.0
        np.testing.assert_allclose(met["pg_loss"], met_none["pg_loss"], rtol=1e-4, atol=1e-7)
        for x, y in zip(jax.tree.leaves(p_is), jax.tree.leaves(p_none)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_shifted_sampler_scales_the_loss_by_the_truncated_weight(models, batch):
    s_graph, s_params, _, _ = models
    old = logprobs(s_graph, s_params, batch)
    b = batch._replace(sampler_logp=old - 0.1)  # the sampler gave every token 0.1 nats less
    _, met_none = run(models, b, mode="grpo")
    _, met_tok = run(models, b, mode="grpo", rollout_is="token")
    np.testing.assert_allclose(met_none["rollout_mismatch/mean"], 0.1, rtol=1e-4)
    np.testing.assert_allclose(met_tok["rollout_is/mean"], np.exp(0.1), rtol=1e-5)
    assert met_tok["rollout_is/clipped_frac"] == 0.0
    np.testing.assert_allclose(met_tok["pg_loss"], np.exp(0.1) * met_none["pg_loss"], rtol=1e-4)
    # sequence level: exp(12 tokens x 0.1) = 3.3 > cap 2 on every row with tokens
    _, met_seq = run(models, b, mode="grpo", rollout_is="sequence", rollout_is_cap=2.0)
    np.testing.assert_allclose(met_seq["rollout_is/mean"], 2.0, rtol=1e-6)
    assert met_seq["rollout_is/clipped_frac"] == 1.0
    np.testing.assert_allclose(met_seq["pg_loss"], 2.0 * met_none["pg_loss"], rtol=1e-4)


def test_rollout_is_without_sampler_logprobs_is_named(models, batch):
    with pytest.raises(ValueError, match="algo.rollout_is=token needs the sampler's log-probs"):
        run(models, batch, mode="grpo", rollout_is="token")


def test_iw_opd_update_uses_the_iw_opd_advantages(models, batch):
    s_graph, s_params, t_graph, t_params = models
    s = np.asarray(logprobs(s_graph, s_params, batch))
    q = np.asarray(logprobs(t_graph, t_params, batch))
    m = np.asarray(batch.response_mask)
    w = loop_weights(s, q, m, 0.5, 1e-8)
    A = np.asarray(grpo_advantages(batch.rewards, batch.group_ids, 2).advantage)
    adv = A[:, None] * m + 0.7 * w * (q - s) * m
    _, met = run(models, batch, mode="iw_opd", opd_coef=0.7)
    on = m.astype(bool)
    np.testing.assert_allclose(met["adv_mean"], adv[on].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([met["adv_max"], met["adv_min"]], [adv[on].max(), adv[on].min()], rtol=1e-4)
    np.testing.assert_allclose(met["iw_opd/mean_weight"], w[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(met["iw_opd/max_weight"], 1.5, rtol=1e-6)
