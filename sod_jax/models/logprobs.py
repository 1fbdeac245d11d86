"""Sampled-token log-probs (and entropy) from hidden states, in token chunks.

At Qwen3's vocabulary (V = 151,936) one 20k-token sequence has ~12 GB of fp32 logits. These
functions ``lax.scan`` over the sequence in windows of ``chunk // B`` positions of every row (about
``chunk`` tokens per step): each step builds ``[B, chunk // B, V]`` logits, reduces them to a
log-prob (and entropy) per token and drops them. Windows cut the sequence axis only, so a batch
sharded over devices stays sharded, with no data movement between devices. The chunk body is rematerialised in the backward pass, so peak memory is O(chunk x V),
independent of T, for values and gradients alike.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sod_jax.parallel import constrain


def _chunk_stats(h: jax.Array, w: jax.Array, y: jax.Array, with_entropy: bool, temperature: float):
    """h ``[B, C, D]``, w ``[D, V]``, y ``[B, C]`` -> (log p(y) ``[B, C]``, entropy ``[B, C]`` or zeros)."""
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)  # [B, C, V]
    if temperature != 1.0:  # in fp32, after the matmul: logits / T as the sampler applies it
        logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    if with_entropy:
        p = jnp.exp(logits - lse[..., None])
        ent = lse - jnp.sum(p * logits, axis=-1)
    else:
        ent = jnp.zeros_like(lse)
    return picked - lse, ent


@partial(jax.jit, static_argnames=("chunk", "with_entropy", "temperature"))
def token_logprobs_and_entropy(
    hidden: jax.Array,  # [B, T, D]
    lm_head: jax.Array,  # [D, V]
    targets: jax.Array,  # [B, T] int
    chunk: int = 256,
    with_entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(log p(targets) ``[B, T]``, entropy of the full distribution ``[B, T]``), both fp32, of
    ``softmax(logits / temperature)``."""
    B, T, D = hidden.shape
    window = max(1, min(T, chunk // B))  # positions per row per step
    n_win = -(-T // window)
    pad = n_win * window - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n_win, window, D).swapaxes(0, 1)
    y = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(B, n_win, window).swapaxes(0, 1)
    # The windows keep the rows' batch sharding (axis 1 now), in the forward and the backward pass:
    # left to itself the partitioner may reshuffle them with an all-to-all at some shapes.
    h = constrain(h, (None, "batch", None, None))
    y = constrain(y, (None, "batch", None))

    body = jax.checkpoint(partial(_chunk_stats, with_entropy=with_entropy, temperature=float(temperature)))

    def step(carry, xs):
        return carry, body(xs[0], lm_head, xs[1])

    _, (lp, ent) = jax.lax.scan(step, None, (h, y))  # [n_win, B, window]
    lp, ent = (x.swapaxes(0, 1).reshape(B, n_win * window)[:, :T] for x in (lp, ent))
    return lp, ent


def token_logprobs(
    hidden: jax.Array,  # [B, T, D]
    lm_head: jax.Array,  # [D, V]
    targets: jax.Array,  # [B, T] int
    chunk: int = 256,
    temperature: float = 1.0,
) -> jax.Array:
    """log p(targets) ``[B, T]`` (fp32) without ever building ``[B, T, V]``; differentiable."""
    return token_logprobs_and_entropy(hidden, lm_head, targets, chunk=chunk, with_entropy=False,
                                      temperature=temperature)[0]


def naive_token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array) -> jax.Array:
    """Reference: full ``[B, T, V]`` log-softmax and gather. For tests and the memory benchmark only."""
    logits = jnp.einsum("btd,dv->btv", hidden, lm_head, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
