"""Benchmarks, each against a baseline run in the same process.

``python -m sod_jax.bench NAME [options]`` prints one JSON object per result line:
``{"bench": ..., "ours": ..., "baseline": ..., "ratio": ...}``. For speed benches ``ratio`` is our
speed over the baseline's (higher is better); for ``memory`` it is our bytes over the baseline's
(lower is better).

Benches:
  memory   compiled temporary memory of chunked sampled-token log-probs (value and gradient)
           versus the naive [T, V] log-softmax gather, at Qwen3's vocabulary.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable


def bench_memory(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from sod_jax.models.logprobs import naive_token_logprobs, token_logprobs

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
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sod_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    mem = sub.add_parser("memory", help="chunked log-prob memory vs naive [T, V] (lower ratio is better)")
    mem.add_argument("--seq", type=int, default=8192, help="sequence length T")
    mem.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen3: 151936)")
    mem.add_argument("--hidden", type=int, default=64, help="hidden size D")
    mem.add_argument("--chunk", type=int, default=256, help="tokens per log-prob chunk")
    mem.set_defaults(fn=bench_memory)
    args = parser.parse_args(argv)
    for row in args.fn(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
