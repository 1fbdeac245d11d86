"""The ragged cache read (two spans merged by log-sum-exp) against the one-span cache attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sod_jax.models.qwen3 import CacheSplit, cache_attention, split_cache_attention


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_cache_attention_equals_cache_attention(T, dtype):
    r = np.random.RandomState(T)
    B, N, K, H, C, common = 7, 4, 2, 16, 128, 64
    q = jnp.asarray(r.randn(B, T, N, H), dtype)
    k = jnp.asarray(r.randn(B, K, H, C), dtype)
    v = jnp.asarray(r.randn(B, K, C, H), dtype)
    starts = np.array([10, 100, 31, 120, 0, 60, 64 - T])  # rows 1, 3 reach past `common`
    idx = jnp.asarray(starts)[:, None] + jnp.arange(T)[None]  # [B, T]
    mask = jnp.arange(C)[None, None] <= idx[:, :, None]
    full = cache_attention(q, k, v, mask).astype(jnp.float32)
    # tail rows: exactly the long ones, or with short rows among them (their tail span is empty)
    for tail in ([1, 3], [0, 1, 3, 6]):
        split = jax.jit(lambda q, k, v, m, rows: split_cache_attention(q, k, v, m, CacheSplit(common, rows)))
        out = split(q, k, v, mask, jnp.asarray(tail, jnp.int32)).astype(jnp.float32)
        assert out.shape == (B, T, N, H)
        tol = 1e-6 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=tol)
    # a long row left out of the tail loses its positions past `common`: the result differs
    wrong = split_cache_attention(q, k, v, mask, CacheSplit(common, jnp.asarray([1], jnp.int32)))
    assert float(jnp.abs(wrong.astype(jnp.float32)[3] - full[3]).max()) > 1e-3
