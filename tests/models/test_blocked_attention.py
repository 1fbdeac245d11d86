"""Blocked causal attention against the dense reference: values, gradients, memory, and the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sod_jax.models import init_model
from sod_jax.models.blocked_attention import blocked_attention
from sod_jax.models.logprobs import token_logprobs
from sod_jax.models.qwen3 import Qwen3Config, attention, attention_mask_from


def qkv(B=2, T=45, N=4, K=2, H=8, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, (B, T, N, H)), jax.random.normal(k2, (B, T, K, H)),
            jax.random.normal(k3, (B, T, K, H)))


def masks(B=2, T=45):
    valid = np.ones((B, T), bool)
    valid[0, :5] = False  # left padding
    valid[1, 40:] = False  # right padding
    seg = np.concatenate([np.zeros((B, 20), np.int32), np.ones((B, T - 20), np.int32)], axis=1)
    return jnp.asarray(valid), jnp.asarray(seg)


@pytest.mark.parametrize("block", [8, 16, 45, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_values_and_grads_match_dense(block, packed):
    q, k, v = qkv()
    valid, seg = masks()
    seg = seg if packed else None
    B, T = valid.shape
    mask = attention_mask_from(jnp.broadcast_to(jnp.arange(T), (B, T)), valid, seg)
    rows = mask.any(-1)[..., None, None]  # query rows that see some key (the rest is padding)
    out = blocked_attention(q, k, v, valid, seg, block)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(jnp.where(rows, out, 0), jnp.where(rows, attention(q, k, v, mask), 0), atol=1e-5)

    w = jax.random.normal(jax.random.PRNGKey(7), q.shape) * rows  # padding rows get no gradient

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    ours = grads(lambda q, k, v: blocked_attention(q, k, v, valid, seg, block))
    ref = grads(lambda q, k, v: attention(q, k, v, mask))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_memory_is_linear_in_length():
    """Compiled temp memory of forward + backward at T=2048: the dense form holds [B, N, T, T]
    scores; the blocked form only [B, N, block, block] blocks and O(T) accumulators."""
    B, T, N, K, H, block = 1, 2048, 4, 2, 16, 128
    q, k, v = qkv(B, T, N, K, H)
    valid = jnp.ones((B, T), bool)
    mask = attention_mask_from(jnp.broadcast_to(jnp.arange(T), (B, T)), valid, None)

    def temp(fn):
        g = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
        return jax.jit(g).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores_bytes = B * N * T * T * 4
    dense = temp(lambda q, k, v: attention(q, k, v, mask))
    blocked = temp(lambda q, k, v: blocked_attention(q, k, v, valid, None, block))
    assert dense >= scores_bytes  # the reference really materialises the scores
    assert blocked < scores_bytes / 8, (blocked, scores_bytes)


def test_model_blocked_equals_dense_with_gradients():
    """The whole model with attention_block=16 on 45 tokens (blocked path) equals attention_block=0
    (dense path): log-probs and parameter gradients on real tokens."""
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_block=0)
    graph, params = nnx.split(init_model(cfg, seed=3))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 45), 0, cfg.vocab_size)
    valid, seg = masks()

    def logp(block, params):
        model = nnx.merge(graph, params)
        model.config = cfg.replace(attention_block=block)
        h = model.hidden_states(ids, attention_mask=valid.astype(jnp.int32), segment_ids=seg)
        lp = token_logprobs(h[:, :-1], model.lm_head_weight(), ids[:, 1:], chunk=16)
        return jnp.where(valid[:, :-1] & valid[:, 1:], lp, 0.0)  # read from a real token's state

    np.testing.assert_allclose(logp(16, params), logp(0, params), atol=1e-5)
    g_blocked = jax.grad(lambda p: logp(16, p).sum())(params)
    g_dense = jax.grad(lambda p: logp(0, p).sum())(params)
    for a, b in zip(jax.tree.leaves(g_blocked), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, atol=1e-5)
