"""Windowed and ragged cache reads (one program for every window) against the whole-cache attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sod_jax.models.qwen3 import CacheRead, cache_attention, read_cache_attention, window_attention

WINDOWS = (32, 64, 128)


def _case(T, dtype, S=7, N=4, K=2, H=16, C=128):
    r = np.random.RandomState(T)
    q = jnp.asarray(r.randn(S, T, N, H), dtype)
    k = jnp.asarray(r.randn(S, K, H, C), dtype)
    v = jnp.asarray(r.randn(S, K, C, H), dtype)
    starts = np.array([10, 100, 31, 120, 0, 60, 64 - T])  # rows 1 and 3 reach past 64
    idx = jnp.asarray(starts)[:, None] + jnp.arange(T)[None]  # [S, T]
    mask = jnp.arange(C)[None, None] <= idx[:, :, None]
    return q, k, v, mask


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_read_equals_whole_cache_attention(T, dtype):
    q, k, v, mask = _case(T, dtype)
    full = np.asarray(cache_attention(q, k, v, mask).astype(jnp.float32))
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    read = jax.jit(lambda q, k, v, m, rows, i, ti: read_cache_attention(q, k, v, m, CacheRead(WINDOWS, i, rows, ti)))
    # tail rows: exactly the long ones, or with short rows among them (they read more than they need)
    for tail in ([1, 3], [0, 1, 3, 6]):
        out = read(q, k, v, mask, jnp.asarray(tail, jnp.int32), jnp.int32(1), jnp.int32(2))  # 64 / 128 positions
        assert out.shape == full.shape
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), full, atol=tol)
    # a long row left out of the tail loses its positions past the window: the result differs
    wrong = read(q, k, v, mask, jnp.asarray([1], jnp.int32), jnp.int32(1), jnp.int32(2))
    assert float(jnp.abs(wrong.astype(jnp.float32)[3] - full[3]).max()) > 1e-3
    # no tail read this call (tail_index < 0): every row reads the common window only
    none = read(q, k, v, mask, jnp.asarray([1, 3], jnp.int32), jnp.int32(2), jnp.int32(-1))
    np.testing.assert_allclose(np.asarray(none.astype(jnp.float32)), full, atol=tol)


def test_window_read_of_gathered_rows():
    """Rows picked from a larger cache (cache extension): each reads only its window of its own row."""
    q, k, v, mask = _case(3, jnp.float32)
    rows = jnp.asarray([4, 0, 2], jnp.int32)  # short rows: 64 positions hold them
    want = cache_attention(q[:3], k[rows], v[rows], mask[rows])
    got = jax.jit(lambda i: window_attention(q[:3], k, v, mask[rows], WINDOWS, i, rows))(jnp.int32(1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # a window too short for row 2 (it attends up to position 33) changes its output
    short = jax.jit(lambda i: window_attention(q[:3], k, v, mask[rows], WINDOWS, i, rows))(jnp.int32(0))
    assert float(jnp.abs(short[2] - want[2]).max()) > 1e-3
