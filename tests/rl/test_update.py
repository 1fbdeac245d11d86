"""The compiled RL update: zero gradient off the response, sharded == unsharded, NaN safety, and
distillation that really moves the student towards the teacher."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sod_jax import optim, parallel
from sod_jax.algo.losses import ppo_loss
from sod_jax.config import OptimConfig
from sod_jax.models import init_model
from sod_jax.models.logprobs import token_logprobs
from sod_jax.models.qwen3 import Qwen3Config
from sod_jax.rl.update import (
    RLBatch,
    UpdateSpec,
    build_update,
    check_compatible,
    init_train_state,
    train_state_shardings,
)

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


def setup(mode, mini_batches=2, lr=1e-3, num_groups=4, mesh=None, student=STUDENT, teacher=TEACHER, **spec_kw):
    """(update, student graphdef, TrainState, teacher graphdef, teacher params)."""
    s_model, t_model = init_model(student, seed=0), init_model(teacher, seed=1)
    s_graph, s_params = nnx.split(s_model)
    t_graph, t_params = nnx.split(t_model)
    spec = UpdateSpec(mode=mode, mini_batches=mini_batches, num_groups=num_groups, logprob_chunk=16, **spec_kw)
    tx, _ = optim.make_optimizer(optim.OptimizerSpec.from_rl(OptimConfig(lr=lr), 1000))
    shardings = None
    if mesh is not None:
        shardings = train_state_shardings(tx, s_params, parallel.param_shardings(s_params, mesh), mesh)
        t_params = jax.device_put(t_params, parallel.param_shardings(t_params, mesh))
    state = init_train_state(tx, s_params, seed=0, shardings=shardings)
    update = build_update(spec, tx, s_graph, t_graph, mesh=mesh, state_shardings=shardings)
    return update, s_graph, state, t_graph, t_params


def random_ids(B, seed=0):
    return np.random.RandomState(seed).randint(3, 32, (B, L))


def test_update_changes_params_and_reports_metrics():
    update, _, state, _, t_params = setup("sod")
    before = jax.tree.map(np.asarray, state.params)
    rewards = np.random.RandomState(0).rand(8)
    state, met = update(state, t_params, make_batch(random_ids(8), rewards, np.repeat(np.arange(4), 2)))
    new_params = state.params
    assert int(met["skipped_updates"]) == 0 and int(state.step) == 2
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
    update, _, state, _, t_params = setup("sod", lr=1e-4, student=SHARDABLE_S, teacher=SHARDABLE_T)
    start = np.asarray(state.params["layers"]["q"][...])
    ref, ref_met = update(state, t_params, batch)
    ref_params = ref.params
    assert np.median(np.abs(np.asarray(ref_params["layers"]["q"][...]) - start)) > 5e-5

    mesh = parallel.make_mesh(**shape)
    update_s, _, state_s, _, t_params_s = setup("sod", lr=1e-4, mesh=mesh, student=SHARDABLE_S, teacher=SHARDABLE_T)
    assert state_s.params["layers"]["q"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    out, met = update_s(state_s, t_params_s, parallel.put_batch(batch, mesh))
    out_params, out_opt = out.params, out.opt_state
    for a, b in zip(jax.tree.leaves(out_params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert out_params["layers"]["q"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = out_opt[1][0].mu["layers"]["gate"][...]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(met["pg_loss"]), float(ref_met["pg_loss"]), rtol=1e-4, atol=1e-6)


def test_nan_reward_skips_update_and_is_reported():
    update, _, state, _, t_params = setup("sod", mini_batches=1)
    before = jax.tree.map(np.asarray, state.params)
    rewards = np.array([1.0, np.nan, 0.0, 1.0, 0, 1, 0, 1])
    state, met = update(state, t_params, make_batch(random_ids(8), rewards, np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 1 and int(met["nonfinite_rewards"]) == 1 and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_nan_logit_skips_only_its_minibatch():
    update, _, state, _, t_params = setup("opd", mini_batches=2)
    t_params["embed"][...] = t_params["embed"][...].at[:].set(jnp.nan)  # every teacher logit is NaN
    before = jax.tree.map(np.asarray, state.params)
    state, met = update(state, t_params, make_batch(random_ids(8), np.zeros(8), np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
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
    update, s_graph, state, t_graph, t_params = setup(mode, mini_batches=2, lr=3e-3, num_groups=8)
    rng = np.random.RandomState(0)
    prompts = jnp.asarray(rng.randint(3, 32, (B, PROMPT)))
    tools = jnp.asarray(rng.randint(3, 32, (B, TOOL)))
    teacher = nnx.merge(t_graph, t_params)

    def measured_kl(params):
        ids = sample(params, s_graph, prompts, tools, jax.random.PRNGKey(123))
        return reverse_kl(nnx.merge(s_graph, params), teacher, ids)

    kl0 = measured_kl(state.params)
    key = jax.random.PRNGKey(0)
    for _ in range(30):
        key, sub = jax.random.split(key)
        ids = sample(state.params, s_graph, prompts, tools, sub)  # rollouts from the current student
        state, met = update(state, t_params, make_batch(ids, np.zeros(B), groups))
        assert int(met["skipped_updates"]) == 0
    kl1 = measured_kl(state.params)
    assert kl1 < 0.7 * kl0, (kl0, kl1)


def test_opsd_teacher_is_the_student_on_a_privileged_context():
    from sod_jax.algo.losses import masked_mean
    from sod_jax.rl.update import sequence_logprobs

    update, graph, state, _, _ = setup("opsd_gt", mini_batches=2)
    params = state.params
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
    _, met = update(state, None, batch)  # no separate teacher params: the student teaches
    assert abs(expected) > 1e-3  # the privileged prefix really changes the log-probs
    np.testing.assert_allclose(float(met["kl_k1"]), expected, rtol=1e-4)


def test_bf16_teacher():
    t_bf16 = dataclasses.replace(TEACHER, param_dtype="bfloat16", dtype="bfloat16")
    update, _, state, _, t_params = setup("sod", teacher=t_bf16)
    assert t_params["embed"][...].dtype == jnp.bfloat16
    _, met = update(state, t_params, make_batch(random_ids(8), np.zeros(8), np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 0 and np.isfinite(float(met["kl_k3"])) and float(met["kl_k3"]) > 0


def test_update_spec_from_config():
    from sod_jax.config import load_config

    cfg = load_config(overrides=["teacher.path=/t", "algo.delta=0.5", "train.mini_batches=8", "algo.loss_agg=seq-mean-token-mean"])
    spec = UpdateSpec.from_config(cfg)
    assert (spec.mode, spec.delta, spec.mini_batches, spec.num_groups, spec.loss_agg) == (
        "sod", 0.5, 8, 64, "seq-mean-token-mean")
    assert spec.needs_teacher and not spec.self_teacher


def test_grpo_mode_needs_no_teacher():
    update, _, state, _, _ = setup("grpo")
    _, met = update(state, None, make_batch(random_ids(8), np.arange(8.0), np.repeat(np.arange(4), 2)))
    assert int(met["skipped_updates"]) == 0 and "kl_k1" not in met


# ---------------------------------------------------------------------------------------------
# Micro-batches, padded rows, strided mini-batches, temperature, the PyTorch golden update
# ---------------------------------------------------------------------------------------------


def padded_batch(ids, rewards, groups, pad_rows, seed=3):
    """The batch plus ``pad_rows`` garbage rows at the end (response tokens, NaN rewards, group -1)
    marked invalid; appended in multiples of the mini-batch count so real rows keep their mini-batch."""
    B = ids.shape[0]
    rng = np.random.RandomState(seed)
    all_ids = np.concatenate([ids, rng.randint(3, 32, (pad_rows, L))])
    batch = make_batch(all_ids, np.concatenate([rewards, np.full(pad_rows, np.nan)]),
                       np.concatenate([groups, np.full(pad_rows, -1)]))
    resp = np.asarray(batch.response_mask).copy()
    resp[B:] = 1  # only row_valid says these rows are padding
    return batch._replace(response_mask=jnp.asarray(resp),
                          row_valid=jnp.asarray(np.arange(B + pad_rows) < B))


def run_update(batch, mini_batches=2, micro_batch_size=0, lr=1e-4, mode="sod", **kw):
    update, _, state, _, t_params = setup(mode, mini_batches=mini_batches, lr=lr,
                                          micro_batch_size=micro_batch_size, **kw)
    state, met = update(state, t_params, batch)
    return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, met), int(state.step)


@pytest.fixture(scope="module")
def unsplit():
    """The un-split, un-padded reference update: 8 rows, 2 mini-batches, one micro-batch each."""
    ids = random_ids(8, seed=11)
    rewards = np.random.RandomState(12).rand(8)
    groups = np.repeat(np.arange(4), 2)
    return (ids, rewards, groups), run_update(make_batch(ids, rewards, groups))


@pytest.mark.parametrize("micro_batch_size", [8, 4, 2])  # 1, 2 and 4 micro-batches per mini-batch
def test_micro_batches_with_padded_rows_equal_the_unsplit_update(unsplit, micro_batch_size):
    (ids, rewards, groups), (ref_params, ref_met, ref_step) = unsplit
    params, met, step = run_update(padded_batch(ids, rewards, groups, pad_rows=8), micro_batch_size=micro_batch_size)
    assert step == ref_step == 2 and int(met["valid_rows"]) == 8
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref_params),
                                                    jax.tree.leaves(jax.tree.map(np.asarray, setup("sod")[2].params))))
    assert moved > 5e-5  # the update really moved the weights (lr 1e-4), so equality means something
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert set(met) == set(ref_met)
    for k in ref_met:
        np.testing.assert_allclose(met[k], ref_met[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_padded_row_with_group_minus_one_does_not_join_a_group():
    from sod_jax.algo.advantages import grpo_advantages

    rewards = jnp.asarray([1.0, 0.0, 1.0, 1.0, 5.0, jnp.nan])
    groups = jnp.asarray([0, 0, 1, 1, -1, -1])
    valid = jnp.asarray([True, True, True, True, False, False])
    st = grpo_advantages(rewards, groups, 2, valid=valid)
    ref = grpo_advantages(rewards[:4], groups[:4], 2)
    np.testing.assert_allclose(np.asarray(st.advantage[:4]), np.asarray(ref.advantage), rtol=1e-6)
    assert np.asarray(st.advantage[4:]).tolist() == [0.0, 0.0]
    assert np.asarray(st.zero_variance).tolist() == [False, False, True, True, False, False]
    # -1 must not wrap into the last real group even for a row marked valid
    st = grpo_advantages(jnp.asarray([1.0, 0.0, 1.0, 1.0, 9.0]), jnp.asarray([0, 0, 1, 1, -1]), 2)
    np.testing.assert_allclose(np.asarray(st.advantage[2:4]), [0.0, 0.0], atol=1e-6)


def test_micro_batch_size_must_divide_the_mini_batch():
    update, _, state, _, t_params = setup("sod", mini_batches=2, micro_batch_size=3)
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        update(state, t_params, make_batch(random_ids(8), np.zeros(8), np.repeat(np.arange(4), 2)))


def collective_counts(mini_batches):
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    update, _, state, _, t_params = setup("sod", mini_batches=mini_batches, mesh=mesh, student=SHARDABLE_S,
                                          teacher=SHARDABLE_T)
    B = 64  # 2 rows per device in each of 4 mini-batches
    batch = parallel.put_batch(make_batch(random_ids(B), np.zeros(B), np.repeat(np.arange(4), 16)), mesh)
    text = update.lower(state, t_params, batch).compile().as_text()
    kinds = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")
    counts = {k: text.count(f" {k}(") + text.count(f" {k}-start(") for k in kinds}
    # all-reduces of arrays (not of scalar metrics): their result type has a non-empty shape
    results = [line.split(" = ", 1)[1].split(" all-reduce", 1)[0] for line in text.splitlines()
               if " all-reduce(" in line or " all-reduce-start(" in line]
    counts["array all-reduce"] = sum(bool(re.search(r"\[\d", r)) for r in results)
    return counts


def test_collectives_do_not_grow_with_mini_batches():
    """Contiguous row blocks as mini-batches made every mini-batch live on a subset of devices and
    cost a reshuffle (all-to-alls and collective-permutes) per split; strided mini-batches are a
    local reshape, and the log-prob windows keep the rows' batch sharding. So no collective that
    moves data (all-to-all, collective-permute, all-gather, reduce-scatter, all-reduce of an array)
    is added by going from 1 to 4 mini-batches. (Scalar metric all-reduces are not data movement:
    with one mini-batch XLA merges the loop's with those after it, with four it cannot.)"""
    one, four = collective_counts(1), collective_counts(4)
    assert one["all-gather"] > 0  # the program is really sharded (fsdp params are gathered)
    for kind in ("all-to-all", "collective-permute", "all-gather", "reduce-scatter", "array all-reduce"):
        assert four[kind] <= one[kind], (kind, one, four)


def test_logprobs_at_temperature_equal_a_plain_recomputation():
    from sod_jax.rl.update import sequence_logprobs

    model = init_model(STUDENT, seed=0)
    graph, params = nnx.split(model)
    ids = jnp.asarray(random_ids(3))
    pos = jnp.broadcast_to(jnp.arange(L), (3, L))
    lp, ent = sequence_logprobs(graph, params, ids, pos, jnp.ones((3, L), jnp.int32), 8, True, temperature=0.7)
    logits = np.asarray(model(ids), np.float64)[:, :-1] / 0.7
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = np.take_along_axis(logits, np.asarray(ids)[:, 1:, None], -1)[..., 0] - logz
    np.testing.assert_allclose(np.asarray(lp)[:, 1:], ref, atol=2e-5)
    p = np.exp(logits - logz[..., None])
    np.testing.assert_allclose(np.asarray(ent)[:, 1:], -(p * np.log(p)).sum(-1), atol=2e-5)
    assert np.abs(np.asarray(sequence_logprobs(graph, params, ids, pos, None, 8)[0])[:, 1:] - ref).max() > 1e-2


def test_cosine_horizon_is_the_runs_optimizer_steps():
    from sod_jax.rl.update import num_optimizer_steps

    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=2)
    tx, _ = optim.make_optimizer(optim.OptimizerSpec.from_rl(cfg, 10))
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    lrs = []
    for _ in range(10):
        upd, state = tx.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(upd["w"]))
    # step 10 of 10 has decayed to 0; warmup reaches the peak at step 2
    assert lrs[2] == pytest.approx(1.0, rel=1e-3) and lrs[-1] < 0.05 and lrs[1] < lrs[2]
    with pytest.raises(ValueError, match="warmup_steps=2"):
        optim.make_optimizer(optim.OptimizerSpec.from_rl(cfg, 2))
    from sod_jax.config import TrainConfig
    assert num_optimizer_steps(TrainConfig(mini_batches=4, epochs=2), 100) == 800


@pytest.fixture(scope="module")
def golden_models(tmp_path_factory):
    """A transformers student/teacher pair and the same weights loaded into ours."""
    from conftest import make_hf_model

    from sod_jax.models import load_pretrained

    arch = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rope_theta=10000.0)
    s_t = make_hf_model(seed=5, tie_word_embeddings=True, **arch)
    t_t = make_hf_model(seed=6, tie_word_embeddings=False, **dict(arch, hidden_size=48))
    dirs = {}
    for name, m in (("student", s_t), ("teacher", t_t)):
        dirs[name] = tmp_path_factory.mktemp(name)
        m.save_pretrained(dirs[name])
    return dirs, load_pretrained


@pytest.mark.parametrize("lr,mini_batches,temperature", [(0.0, 1, 1.0), (1e-4, 1, 1.0), (1e-4, 2, 0.7),
                                                        (1e-4, 4, 1.0)])
def test_update_equals_the_pytorch_reference(golden_models, tmp_path, lr, mini_batches, temperature):
    import torch
    from transformers import Qwen3ForCausalLM

    from sod_jax.bench.train_step import TorchUpdate
    from sod_jax.models import save_pretrained

    dirs, load_pretrained = golden_models
    B = 8
    ids = random_ids(B, seed=21)
    resp = response_mask(B)
    resp[3, -2:] = 0
    rewards = np.random.RandomState(22).rand(B).astype(np.float32)
    groups = np.repeat(np.arange(4), 2)
    clip = dict(clip_low=0.002, clip_high=0.003)  # tight, so lr 1e-4 already clips some tokens

    student = Qwen3ForCausalLM.from_pretrained(dirs["student"], attn_implementation="eager", dtype=torch.float32)
    teacher = Qwen3ForCausalLM.from_pretrained(dirs["teacher"], attn_implementation="eager", dtype=torch.float32)
    ref = TorchUpdate(student, teacher, lr=lr)(ids, resp, rewards, groups, mini_batches, temperature, **clip)

    s_model, t_model = load_pretrained(dirs["student"]), load_pretrained(dirs["teacher"])
    s_graph, s_params = nnx.split(s_model)
    t_graph, t_params = nnx.split(t_model)
    tx, _ = optim.make_optimizer(optim.OptimizerSpec.from_rl(OptimConfig(lr=lr), 1000))
    spec = UpdateSpec(mode="sod", mini_batches=mini_batches, num_groups=4, logprob_chunk=16,
                      temperature=temperature, **clip)
    batch = make_batch(ids, rewards, groups)._replace(response_mask=jnp.asarray(resp))
    update = build_update(spec, tx, s_graph, t_graph)
    state, met = update(init_train_state(tx, s_params, seed=0), t_params, batch)

    # advantages and step weights (the update reports their statistics)
    on = resp > 0
    adv, w = ref["adv"][on], ref["weights"]
    np.testing.assert_allclose([met["adv_mean"], met["adv_max"], met["adv_min"], met["adv_std"]],
                               [adv.mean(), adv.max(), adv.min(), adv.std()], rtol=1e-4, atol=1e-6)
    second = on & (np.cumsum(np.diff(np.pad(on, ((0, 0), (1, 0))).astype(int), axis=1) == 1, axis=1) == 2)
    np.testing.assert_allclose(float(met["step_w_mean_by_k"][1]),
                               np.mean([w[b][second[b]][0] for b in range(B)]), rtol=1e-5)
    kl = (ref["old_logp"] - ref["teacher_logp"])[on].mean()
    np.testing.assert_allclose(float(met["kl_k1"]), kl, rtol=1e-4, atol=1e-6)
    # per-mini-batch metrics, averaged as the update reports them
    for key in ("pg_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean",
                "grad_norm"):
        np.testing.assert_allclose(float(met[key]), np.mean([m[key] for m in ref["metrics"]]),
                                   rtol=1e-4, atol=2e-6, err_msg=key)
    if lr > 0 and mini_batches > 1:
        assert float(met["clip_frac"]) > 0  # later mini-batches really clip
    # the updated parameters, compared in the HF layout
    out = tmp_path / "ours"
    save_pretrained(nnx.merge(s_graph, state.params), out)
    ours = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    moved = 0.0
    for name, p in student.state_dict().items():
        np.testing.assert_allclose(ours[name].numpy(), p.numpy(), atol=1e-5, rtol=0, err_msg=name)
    init = Qwen3ForCausalLM.from_pretrained(dirs["student"], dtype=torch.float32).state_dict()
    moved = max(float((init[n] - p).abs().max()) for n, p in student.state_dict().items())
    assert (moved > 5e-5) == (lr > 0)


def test_ppo_epochs_repeat_the_mini_batches_with_fixed_advantages(unsplit):
    """epochs=2: 2 x mini_batches optimizer steps over the same rollouts; the second pass starts from
    the first pass's params (so it differs from one pass) and keeps the old log-probs of the rollout."""
    (ids, rewards, groups), (ref_params, ref_met, _) = unsplit
    params, met, step = run_update(make_batch(ids, rewards, groups), epochs=2)
    assert step == 4 and int(met["skipped_updates"]) == 0
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))) > 1e-5
    assert float(met["ratio_max"]) > float(ref_met["ratio_max"])  # later passes see the moved policy
