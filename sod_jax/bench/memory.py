"""Compiled temporary memory of chunked log-probs and blocked attention against the dense forms."""

from __future__ import annotations

import argparse
from typing import Callable

import jax
import jax.numpy as jnp

from sod_jax.models.blocked_attention import blocked_attention
from sod_jax.models.logprobs import naive_token_logprobs, token_logprobs
from sod_jax.models.qwen3 import attention, attention_mask_from


def run(args: argparse.Namespace) -> list[dict]:
    T, V, D, chunk = args.seq, args.vocab, args.hidden, args.chunk
    h = jax.ShapeDtypeStruct((1, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    y = jax.ShapeDtypeStruct((1, T), jnp.int32)
    logits_bytes = T * V * 4

    def temp_bytes(fn: Callable) -> int:
        return int(jax.jit(fn).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes)

    def grad_of(f: Callable) -> Callable:
        return lambda h, w, y: jax.value_and_grad(lambda h, w: f(h, w, y).sum(), argnums=(0, 1))(h, w)

    ours_fn = lambda h, w, y: token_logprobs(h, w, y, chunk=chunk)  # noqa: E731
    rows = []
    for mode, ours, base in (("forward", ours_fn, naive_token_logprobs),
                             ("value_and_grad", grad_of(ours_fn), grad_of(naive_token_logprobs))):
        o, b = temp_bytes(ours), temp_bytes(base)
        rows.append({"bench": "memory", "mode": mode, "T": T, "V": V, "D": D, "chunk": chunk,
                     "ours": o, "baseline": b, "ratio": round(o / b, 5),
                     "ours_over_one_fp32_TxV": round(o / logits_bytes, 5), "unit": "bytes (compiled temp)"})
    rows.append(_attention_memory(T, args.attention_block))
    return rows


def _attention_memory(T: int, block: int) -> dict:
    """Compiled temp bytes of one layer's causal attention, forward and backward, at Qwen3-1.7B's
    head layout (16 query heads, 8 kv heads, head dim 128): blocked versus dense ``[T, T]`` scores."""

    N, K, H = 16, 8, 128
    q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, K, H), jnp.float32)
    valid = jnp.ones((1, T), bool)

    def temp(fn: Callable) -> int:
        g = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
        return int(jax.jit(g).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes)

    mask = lambda: attention_mask_from(jnp.arange(T)[None], valid, None)  # noqa: E731
    o = temp(lambda q, k, v: blocked_attention(q, k, v, valid, None, block))
    b = temp(lambda q, k, v: attention(q, k, v, mask()))
    return {"bench": "memory", "mode": "attention_value_and_grad", "T": T, "heads": f"{N}/{K}x{H}",
            "block": block, "ours": o, "baseline": b, "ratio": round(o / b, 5), "unit": "bytes (compiled temp)"}


def add_parser(sub) -> None:
    p = sub.add_parser("memory", help="chunked log-prob memory vs naive [T, V] (lower ratio is better)")
    p.add_argument("--seq", type=int, default=8192, help="sequence length T")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen3: 151936)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size D")
    p.add_argument("--chunk", type=int, default=256, help="tokens per log-prob chunk")
    p.add_argument("--attention-block", type=int, default=512, help="blocked attention block (model.attention_block)")
    p.set_defaults(fn=run)
