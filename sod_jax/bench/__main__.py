"""Benchmarks, each against a baseline run in the same process.

``python -m sod_jax.bench NAME [options]`` prints one JSON object per result line:
``{"bench": ..., "ours": ..., "baseline": ..., "ratio": ...}``. For speed benches ``ratio`` is our
speed over the baseline's (higher is better); for ``memory`` it is our bytes over the baseline's
(lower is better).

Benches:
  sandbox  executions/s and p50/p99 latency of ``print(1)``: the warm executor against the cold one,
           the cold one against a bare subprocess, and the server path at concurrency 8 and 32.
  rollout  generated tokens/s of the slot engine against transformers ``generate`` on the same
           random model, same prompts, same number of new tokens, greedy and
           sampled (top-p 0.9); default preset cpu-tiny (4 layers, d=128, V=512).
  train-step   tokens/s of the whole RL update (student fwd + teacher fwd + student fwd/bwd + loss +
           AdamW) against the same update in PyTorch eager (transformers Qwen3), plus MFU against a
           measured matmul peak. Preset: student 256/4 layers, teacher 384/6, vocab 4096, B=16, T=512.
  sod-weights  jitted segment-sum SOD step weights versus a per-token Python loop (the reference's
           approach) on B=64, T=8192 with ~8 steps per row.
  rl-step  one whole RL step of the CPU demo's shape (rollouts with tool calls in the local sandbox,
           rewards, the update) through the trainer, split into its parts (random cpu-tiny models).
  weight-sync  the refresh of the engine's sampling copy after an update (one jitted cast + reshard
           on the devices) against a host round trip; Qwen3-0.6B on the available (fake) devices.
  memory   compiled temporary memory of chunked sampled-token log-probs (value and gradient)
           versus the naive [T, V] log-softmax gather, at Qwen3's vocabulary; and of one layer's
           blocked causal attention (forward and backward) versus dense [T, T] scores.
"""

from __future__ import annotations

import argparse
import json

from sod_jax.bench import memory, rl_step, rollout, sandbox, sod_weights, train_step, weight_sync

BENCHES = (sandbox, rollout, train_step, rl_step, sod_weights, weight_sync, memory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sod_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for bench in BENCHES:
        bench.add_parser(sub)
    args = parser.parse_args(argv)
    for row in args.fn(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
