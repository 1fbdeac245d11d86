"""The compiled RL update: zero gradient off the response, sharded == unsharded, NaN safety, and
distillation that really moves the student towards the teacher."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sod_jax import parallel
from sod_jax.algo.losses import ppo_loss
from sod_jax.config import OptimConfig
from sod_jax.models import init_model
from sod_jax.models.logprobs import token_logprobs
from sod_jax.models.qwen3 import Qwen3Config
from sod_jax.train_step import (RLBatch, UpdateSpec, build_update, check_compatible, init_optimizer,
                                make_optimizer, optimizer_shardings)

STUDENT = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
TEACHER = dataclasses.replace(STUDENT, hidden_size=48, num_hidden_layers=3, intermediate_size=96,
                              tie_word_embeddings=False)
PROMPT, STEP, TOOL = 4, 6, 3
L = PROMPT + STEP + TOOL + STEP  # prompt | step 1 | tool output | step 2


def response_mask(B):
    m = np.zeros((B, L), np.int32)
    m[:, PROMPT:PROMPT + STEP] = 1
    m[:, PROMPT + STEP + TOOL:] = 1
    return m


@jax.jit
def sample(params, graphdef, prompts, tool_tokens, key):
    """Student rollouts: prompt, STEP sampled tokens, TOOL forced tokens, STEP sampled tokens (full
    forward per position: tiny model, test only)."""
    B = prompts.shape[0]
    ids = jnp.zeros((B, L), jnp.int32).at[:, :PROMPT].set(prompts)
    ids = ids.at[:, PROMPT + STEP:PROMPT + STEP + TOOL].set(tool_tokens)
    sampled = jnp.asarray(response_mask(1)[0].astype(bool))
    model = nnx.merge(graphdef, params)

    def body(t, carry):
        ids, key = carry
        key, sub = jax.random.split(key)
        logits = model(ids)[:, t - 1]
        tok = jax.random.categorical(sub, logits)
        return jnp.where(sampled[t], ids.at[:, t].set(tok), ids), key

    ids, _ = jax.lax.fori_loop(PROMPT, L, body, (ids, key))
    return ids


def reverse_kl(s_model, t_model, ids):
    """Exact mean over response tokens of KL(student || teacher) of the predicting distributions."""
    ls = jax.nn.log_softmax(s_model(ids)[:, :-1], -1)
    lt = jax.nn.log_softmax(t_model(ids)[:, :-1], -1)
    kl = jnp.sum(jnp.exp(ls) * (ls - lt), -1)
    m = jnp.asarray(response_mask(ids.shape[0])[:, 1:])
    return float(jnp.sum(kl * m) / jnp.sum(m))


def make_batch(ids, rewards, groups):
    B = ids.shape[0]
    return RLBatch(input_ids=jnp.asarray(ids), attention_mask=jnp.ones((B, L), jnp.int32),
                   positions=jnp.broadcast_to(jnp.arange(L), (B, L)), response_mask=jnp.asarray(response_mask(B)),
                   rewards=jnp.asarray(rewards, jnp.float32), group_ids=jnp.asarray(groups, jnp.int32))


def setup(mode, mini_batches=2, lr=1e-3, num_groups=4, mesh=None, student=STUDENT, teacher=TEACHER):
    s_model, t_model = init_model(student, seed=0), init_model(teacher, seed=1)
    s_graph, s_params = nnx.split(s_model)
    t_graph, t_params = nnx.split(t_model)
    spec = UpdateSpec(mode=mode, mini_batches=mini_batches, num_groups=num_groups, logprob_chunk=16)
    tx = make_optimizer(OptimConfig(lr=lr))
    p_sh = o_sh = None
    if mesh is not None:
        p_sh = parallel.param_shardings(s_params, mesh)
        s_params = jax.device_put(s_params, p_sh)
        t_params = jax.device_put(t_params, parallel.param_shardings(t_params, mesh))
        o_sh = optimizer_shardings(tx, s_params, p_sh, mesh)
    opt = init_optimizer(tx, s_params, o_sh)
    update = build_update(spec, tx, s_graph, t_graph, mesh=mesh, param_shardings=p_sh, opt_shardings=o_sh)
    return update, s_graph, s_params, t_graph, t_params, opt


def random_ids(B, seed=0):
    return np.random.RandomState(seed).randint(3, 32, (B, L))


def test_update_changes_params_and_reports_metrics():
    update, _, params, _, t_params, opt = setup("sod")
    before = jax.tree.map(np.asarray, params)
    rewards = np.random.RandomState(0).rand(8)
    new_params, opt, met = update(params, opt, t_params, make_batch(random_ids(8), rewards, np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 0
    assert any(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(before)))
    for key in ("pg_loss", "clip_frac", "kl_k1", "kl_k3", "entropy", "step_w_mean_by_k", "d_mean",
                "zero_variance_group_frac", "grad_norm", "adv_std"):
        assert np.all(np.isfinite(np.asarray(met[key]))), key
    assert np.asarray(met["step_count_by_k"])[:2].tolist() == [8, 8]
    assert float(np.asarray(met["step_w_mean_by_k"])[0]) == 1.0


def test_tool_tokens_and_padding_contribute_zero_gradient():
    model = init_model(STUDENT, seed=0)
    graph, params = nnx.split(model)
    B = 4
    ids = jnp.asarray(random_ids(B))
    m = response_mask(B).astype(np.float32)
    m[1, -3:] = 0  # right padding on one row
    rng = np.random.RandomState(5)
    old = jnp.asarray(-rng.rand(B, L))
    adv = jnp.asarray(rng.randn(B, L))

    def loss(p, targets, old, adv):
        mdl = nnx.merge(graph, p)
        lp = token_logprobs(mdl.hidden_states(ids), mdl.lm_head_weight(), targets, chunk=8)
        return ppo_loss(lp, old, adv, jnp.asarray(m))[0]

    targets = jnp.asarray(random_ids(B, seed=1))
    g0 = jax.grad(loss)(params, targets, old, adv)
    off = m == 0
    targets2 = jnp.where(off, (targets + 7) % 32, targets)
    old2 = jnp.where(off, jnp.nan, old)
    adv2 = jnp.where(off, jnp.inf, adv)
    g1 = jax.grad(loss)(params, targets2, old2, adv2)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the check can fail: changing an on-mask target does change the gradient
    g2 = jax.grad(loss)(params, jnp.where(off, targets, (targets + 7) % 32), old, adv)
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)))


SHARDABLE_S = dataclasses.replace(STUDENT, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, intermediate_size=128)
SHARDABLE_T = dataclasses.replace(SHARDABLE_S, num_hidden_layers=3, tie_word_embeddings=False)


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_update_equals_unsharded(shape):
    B = 8
    batch = make_batch(random_ids(B), np.random.RandomState(1).rand(B), np.repeat(np.arange(4), 2))
    # lr 1e-4: Adam's first step moves every weight by ~lr (10x the tolerance), yet elements whose
    # gradient is ~0 (where m / sqrt(v) depends on summation order) stay within it.
    update, _, params, _, t_params, opt = setup("sod", lr=1e-4, student=SHARDABLE_S, teacher=SHARDABLE_T)
    start = np.asarray(params["layers"]["q"][...])
    ref_params, _, ref_met = update(params, opt, t_params, batch)
    assert np.median(np.abs(np.asarray(ref_params["layers"]["q"][...]) - start)) > 5e-5

    mesh = parallel.make_mesh(**shape)
    update_s, _, params_s, _, t_params_s, opt_s = setup("sod", lr=1e-4, mesh=mesh, student=SHARDABLE_S,
                                                        teacher=SHARDABLE_T)
    assert params_s["layers"]["q"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    out_params, out_opt, met = update_s(params_s, opt_s, t_params_s, parallel.put_batch(batch, mesh))
    for a, b in zip(jax.tree.leaves(out_params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert out_params["layers"]["q"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = out_opt[1][0].mu["layers"]["gate"][...]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(met["pg_loss"]), float(ref_met["pg_loss"]), rtol=1e-4, atol=1e-6)


def test_nan_reward_skips_update_and_is_reported():
    update, _, params, _, t_params, opt = setup("sod", mini_batches=1)
    before = jax.tree.map(np.asarray, params)
    rewards = np.array([1.0, np.nan, 0.0, 1.0, 0, 1, 0, 1])
    new_params, _, met = update(params, opt, t_params, make_batch(random_ids(8), rewards, np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 1 and int(met["nonfinite_rewards"]) == 1
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_nan_logit_skips_only_its_minibatch():
    update, _, params, _, t_params, opt = setup("opd", mini_batches=2)
    t_params["embed"][...] = t_params["embed"][...].at[:].set(jnp.nan)  # every teacher logit is NaN
    before = jax.tree.map(np.asarray, params)
    new_params, _, met = update(params, opt, t_params, make_batch(random_ids(8), np.zeros(8), np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 2
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_vocab_and_special_token_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="student vocab_size=32, teacher vocab_size=64"):
        check_compatible(STUDENT, dataclasses.replace(TEACHER, vocab_size=64))
    with pytest.raises(ValueError, match="student eos_token_id=2, teacher eos_token_id=5"):
        check_compatible(STUDENT, dataclasses.replace(TEACHER, eos_token_id=5))
    with pytest.raises(ValueError, match="student pad=0, teacher pad=3"):
        check_compatible(STUDENT, TEACHER, {"pad": 0}, {"pad": 3})
    check_compatible(STUDENT, TEACHER, {"pad": 0}, {"pad": 0})


@pytest.mark.parametrize("mode", ["opd", "sod"])
def test_distillation_reduces_reverse_kl(mode):
    B, groups = 32, np.repeat(np.arange(8), 4)
    update, s_graph, params, t_graph, t_params, opt = setup(mode, mini_batches=2, lr=3e-3, num_groups=8)
    rng = np.random.RandomState(0)
    prompts = jnp.asarray(rng.randint(3, 32, (B, PROMPT)))
    tools = jnp.asarray(rng.randint(3, 32, (B, TOOL)))
    teacher = nnx.merge(t_graph, t_params)

    def measured_kl(params):
        ids = sample(params, s_graph, prompts, tools, jax.random.PRNGKey(123))
        return reverse_kl(nnx.merge(s_graph, params), teacher, ids)

    kl0 = measured_kl(params)
    key = jax.random.PRNGKey(0)
    for _ in range(30):
        key, sub = jax.random.split(key)
        ids = sample(params, s_graph, prompts, tools, sub)  # rollouts from the current student
        params, opt, met = update(params, opt, t_params, make_batch(ids, np.zeros(B), groups))
        assert int(met["skipped_updates"]) == 0
    kl1 = measured_kl(params)
    assert kl1 < 0.7 * kl0, (kl0, kl1)


def test_opsd_teacher_is_the_student_on_a_privileged_context():
    from sod_jax.algo.losses import masked_mean
    from sod_jax.train_step import sequence_logprobs

    update, graph, params, _, _, opt = setup("opsd_gt", mini_batches=2)
    B, P = 8, 5
    ids = random_ids(B)
    priv = np.random.RandomState(7).randint(3, 32, (B, P))
    t_ids = np.concatenate([priv, ids], axis=1)
    batch = make_batch(ids, np.zeros(B), np.repeat(np.arange(4), 2))._replace(
        teacher_input_ids=jnp.asarray(t_ids), teacher_attention_mask=jnp.ones((B, L + P), jnp.int32),
        teacher_positions=jnp.broadcast_to(jnp.arange(L + P), (B, L + P)),
        teacher_index=jnp.broadcast_to(jnp.arange(L) + P, (B, L)))
    s, _ = sequence_logprobs(graph, params, batch.input_ids, batch.positions, batch.attention_mask, 16)
    q, _ = sequence_logprobs(graph, params, batch.teacher_input_ids, batch.teacher_positions,
                             batch.teacher_attention_mask, 16)
    m = batch.response_mask
    expected = float(masked_mean(s - q[:, P:], m))
    _, _, met = update(params, opt, None, batch)  # no separate teacher params: the student teaches
    assert abs(expected) > 1e-3  # the privileged prefix really changes the log-probs
    np.testing.assert_allclose(float(met["kl_k1"]), expected, rtol=1e-4)


def test_bf16_teacher():
    t_bf16 = dataclasses.replace(TEACHER, param_dtype="bfloat16", dtype="bfloat16")
    update, _, params, _, t_params, opt = setup("sod", teacher=t_bf16)
    assert t_params["embed"][...].dtype == jnp.bfloat16
    _, _, met = update(params, opt, t_params, make_batch(random_ids(8), np.zeros(8), np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 0 and np.isfinite(float(met["kl_k3"])) and float(met["kl_k3"]) > 0


def test_update_spec_from_config():
    from sod_jax.config import load_config

    cfg = load_config(overrides=["teacher.path=/t", "algo.delta=0.5", "train.mini_batches=8", "algo.loss_agg=seq-mean-token-mean"])
    spec = UpdateSpec.from_config(cfg)
    assert (spec.mode, spec.delta, spec.mini_batches, spec.num_groups, spec.loss_agg) == (
        "sod", 0.5, 8, 64, "seq-mean-token-mean")
    assert spec.needs_teacher and not spec.self_teacher


def test_grpo_mode_needs_no_teacher():
    update, _, params, _, _, opt = setup("grpo")
    _, _, met = update(params, opt, None, make_batch(random_ids(8), np.arange(8.0), np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 0 and "kl_k1" not in met
