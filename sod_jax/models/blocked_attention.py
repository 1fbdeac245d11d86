"""Causal self-attention in blocks: O(T x block) memory, masked blocks skipped.

The dense :func:`sod_jax.models.qwen3.attention` builds ``[B, N, T, T]`` scores: at the paper's
20k-token trajectories that is tens of GB per layer. Here queries and keys are cut into blocks of
``block`` tokens; query block i visits key blocks 0..i only (the causal triangle: about half the
score FLOPs of the dense form) with an online softmax, and the backward pass is written out
(``jax.custom_vjp``) so it recomputes scores block by block from the saved log-sum-exp instead of
keeping them: memory stays linear in T in both directions.

The mask is the one of :func:`sod_jax.models.qwen3.attention_mask_from`, built per block pair
from ``[B, T]`` vectors: key s is visible to query t when ``s <= t`` (index order), key s is a
valid token, and both are in the same segment. Query rows with no visible key (padding) get a
finite output that nothing reads (the dense form's differs); every other row matches it.

Shapes: B batch, T tokens, N query heads, K kv heads, G = N // K, H head dim, b block.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

MASKED_SCORE = -1e30  # for masked scores/logits: finite, so a fully masked row stays NaN-free


def _block_mask(i, j, b: int, valid: jax.Array, seg: jax.Array) -> jax.Array:
    """``[B, b, b]`` visibility of key block j to query block i."""
    q_idx = i * b + jnp.arange(b)
    k_idx = j * b + jnp.arange(b)
    k_valid = jax.lax.dynamic_slice_in_dim(valid, j * b, b, axis=1)  # [B, b]
    q_seg = jax.lax.dynamic_slice_in_dim(seg, i * b, b, axis=1)
    k_seg = jax.lax.dynamic_slice_in_dim(seg, j * b, b, axis=1)
    causal = k_idx[None, :] <= q_idx[:, None]  # [b, b]
    return causal[None] & k_valid[:, None, :] & (q_seg[:, :, None] == k_seg[:, None, :])


def _scores(qi, kj, mask, scale):
    """Masked fp32 scores ``[B, K, G, b, b]`` of a query block ``[B, K, G, b, H]`` and key block ``[B, K, b, H]``."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, MASKED_SCORE)


def _forward(q, k, v, valid, seg, b: int):
    """Heads-major inputs q ``[B, K, G, T, H]``, k/v ``[B, K, T, H]`` (T a multiple of b).
    Returns the output (q's layout and dtype) and the log-sum-exp ``[B, K, G, T]`` fp32."""
    B, K, G, T, H = q.shape
    scale = H**-0.5
    nb = T // b

    def query_block(i):
        qi = jax.lax.dynamic_slice_in_dim(q, i * b, b, axis=3)

        def key_block(j, carry):
            m, l, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(k, j * b, b, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(v, j * b, b, axis=2)
            s = _scores(qi, kj, _block_mask(i, j, b, valid, seg), scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l, acc * alpha[..., None] + pv

        init = (jnp.full((B, K, G, b), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, b), jnp.float32),
                jnp.zeros((B, K, G, b, H), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # causal: key blocks 0..i
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(query_block, jnp.arange(nb))  # [nb, B, K, G, b, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, T, H)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, T)
    return out, lse


def _backward(q, k, v, valid, seg, out, lse, d_out, b: int):
    """Gradients of q, k, v (flash-attention style: per key block, sweep the query blocks that see it)."""
    B, K, G, T, H = q.shape
    scale = H**-0.5
    nb = T // b
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]

    def key_block(dq, j):
        kj = jax.lax.dynamic_slice_in_dim(k, j * b, b, axis=2)
        vj = jax.lax.dynamic_slice_in_dim(v, j * b, b, axis=2)

        def query_block(i, carry):
            dq, dk, dv = carry
            qi = jax.lax.dynamic_slice_in_dim(q, i * b, b, axis=3)
            doi = jax.lax.dynamic_slice_in_dim(d_out, i * b, b, axis=3)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * b, b, axis=3)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * b, b, axis=3)
            p = jnp.exp(_scores(qi, kj, _block_mask(i, j, b, valid, seg), scale) - lse_i[..., None])
            dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * b, b, axis=3) + dq_i, i * b, axis=3)
            dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((B, K, b, H), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, nb, query_block, (dq, zeros, zeros))  # query blocks that see j
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nb))
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, T, H)
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, T, H)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _heads_major(q, k, v, valid, seg, b):
    return _forward(q, k, v, valid, seg, b)[0]


def _heads_major_fwd(q, k, v, valid, seg, b):
    out, lse = _forward(q, k, v, valid, seg, b)
    return out, (q, k, v, valid, seg, out, lse)


def _heads_major_bwd(b, res, d_out):
    q, k, v, valid, seg, out, lse = res
    return _backward(q, k, v, valid, seg, out, lse, d_out, b) + (None, None)


_heads_major.defvjp(_heads_major_fwd, _heads_major_bwd)


def blocked_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    valid: jax.Array,  # [B, T] bool: real tokens (padding is never attended to)
    segment_ids: Optional[jax.Array] = None,  # [B, T] packed sequences attend within a segment
    block: int = 512,
) -> jax.Array:
    """Causal GQA self-attention ``[B, T, N, H]`` in blocks of ``block`` tokens (T is padded up to
    a multiple of it). Query head n reads kv head ``n // G`` (HF's ``repeat_kv`` order)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    b = min(block, T)
    Tp = -(-T // b) * b
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    valid = valid.astype(bool)
    if Tp != T:  # padded keys are invalid; padded query rows are dropped below
        pad = ((0, 0), (0, Tp - T))
        q, k, v = (jnp.pad(a, pad + ((0, 0), (0, 0))) for a in (q, k, v))
        valid, seg = jnp.pad(valid, pad), jnp.pad(seg, pad, constant_values=-1)
    qh = q.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, Tp, H]
    out = _heads_major(qh, kh, vh, valid, seg, b)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]
