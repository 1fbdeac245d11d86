"""The planner's arithmetic: pure functions of sizes, no compiling.

Units: bytes, FLOPs, seconds. ``cfg`` is a :class:`sod_jax.models.qwen3.Qwen3Config`. Symbols
used in the formulas (and in the report's formula strings): D hidden size, F MLP size, N query
heads, K kv heads, H head dim, L layers, V vocabulary, T tokens per row, b bytes per element.

These give (a) FLOP counts for step-time estimates where XLA's own ``cost_analysis()`` cannot
(it counts a loop body once; the update is loops of loops), (b) the GPU estimate's memory by
formula, and (c) the search over knob values.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np


def itemsize(dtype: Any) -> int:
    """Bytes per element of a dtype or dtype name (``"bfloat16"`` -> 2)."""
    import jax.numpy as jnp

    from sod_jax.models.qwen3 import as_dtype

    return int(jnp.dtype(as_dtype(dtype)).itemsize)


def chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ``jax.ShapeDtypeStruct`` / arrays: each leaf's shard
    shape (its sharding's, or the whole shape without one) x its item size."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(tuple(leaf.shape)) if sharding is not None else tuple(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * int(np.dtype(leaf.dtype).itemsize)
    return total


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def layer_matmul_params(cfg: Any) -> int:
    """Matmul weights of one decoder layer: D*H*(N+2K) (q, k, v) + N*H*D (o) + 3*D*F (gate, up, down)."""
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    N, K = cfg.num_attention_heads, cfg.num_key_value_heads
    return D * H * (N + 2 * K) + N * H * D + 3 * D * F


def attention_context(T: int, block: int) -> float:
    """Key positions each query attends to, on average, as computed: dense attention computes all
    T (and masks), blocked causal attention (T > block > 0) the blocks up to the diagonal, (T + block) / 2."""
    if block and T > block:
        return (T + block) / 2
    return float(T)


def forward_flops(cfg: Any, rows: int, T: int, block: int = 0, lm_head: bool = True) -> float:
    """FLOPs of one forward pass over ``rows x T`` tokens:
    rows*T*(L*(2*P_layer + 4*N*H*ctx) + 2*D*V), with P_layer = :func:`layer_matmul_params` and
    ctx = :func:`attention_context` (QK^T and PV); the lm-head term when every position's log-prob
    is computed."""
    per_token = cfg.num_hidden_layers * (2 * layer_matmul_params(cfg)
                                         + 4 * cfg.num_attention_heads * cfg.head_dim * attention_context(T, block))
    if lm_head:
        per_token += 2 * cfg.hidden_size * cfg.vocab_size
    return float(rows) * T * per_token


def train_passes(remat: str) -> int:
    """Forward-pass equivalents of one training pass: forward 1 + backward 2, + 1 recomputed forward
    under ``remat: full`` (``dots`` keeps the matmul outputs, so it recomputes no matmul)."""
    return 4 if remat == "full" else 3


def update_flops(student: Any, teacher: Optional[Any], rows: int, T: int, *, epochs: int = 1, remat: str = "full",
                 student_block: int = 0, teacher_block: int = 0) -> dict[str, float]:
    """FLOPs of one RL update over ``rows x T`` tokens, the whole mesh: the old-policy forward, the
    teacher forward (``teacher`` None: none), and ``epochs`` training passes (:func:`train_passes`)."""
    fwd = forward_flops(student, rows, T, student_block)
    out = {"old_logprobs": fwd, "train": epochs * train_passes(remat) * fwd}
    if teacher is not None:
        out["teacher"] = forward_flops(teacher, rows, T, teacher_block)
    return out


def update_hbm_bytes(student: Any, teacher: Optional[Any], *, tokens_per_chip: float, micro_batches: int,
                     mini_batches: int, epochs: int, remat: str, student_param_bytes: int, compute_bytes: int,
                     teacher_bytes: int, fsdp: int) -> dict[str, float]:
    """HBM bytes one chip moves in an RL update, by the dominant terms:

    * weights: every micro-batch pass reads the whole (gathered) weights: student P*b x
      (1 old-policy + train passes) x micro-batches, teacher P_t*b_t x micro-batches;
    * optimizer: per optimizer step read and write params and both Adam moments, read the gradient
      (7 x P x param bytes / fsdp), plus accumulating micro-batch gradients (2 x P x 4 / fsdp each);
    * logits: every token's vocabulary row in fp32 written and read once per pass (chunked log-probs);
    * activations: each layer's input written and read once per pass (b x D x L per token)."""
    P = student.num_params()
    steps = mini_batches * epochs
    micro = micro_batches * steps
    passes = train_passes(remat) - 1  # the backward counts as two forwards of FLOPs but one read of weights
    w = P * compute_bytes * (micro_batches * mini_batches + micro * passes)
    if teacher is not None:
        w += teacher.num_params() * teacher_bytes * micro_batches * mini_batches
    opt = steps * 7 * P * student_param_bytes / fsdp + (micro * 2 * P * 4 / fsdp if micro_batches > 1 else 0.0)
    n_pass = 1 + (1 if teacher is not None else 0) + epochs * passes
    logits = tokens_per_chip * student.vocab_size * 4 * 2 * n_pass
    act = tokens_per_chip * compute_bytes * student.hidden_size * student.num_hidden_layers * 2 * n_pass
    return {"weights": float(w), "optimizer": float(opt), "logits": float(logits), "activations": float(act)}


def roofline_seconds(flops: float, nbytes: float, peak_flops: float, hbm_bw: float) -> tuple[float, str]:
    """max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) and which term binds ("compute" | "memory")."""
    tc, tm = flops / peak_flops, nbytes / hbm_bw
    return (tc, "compute") if tc >= tm else (tm, "memory")


# ---------------------------------------------------------------------------------------------
# Memory by formula (the GPU estimate)
# ---------------------------------------------------------------------------------------------


def kv_bytes_per_slot(cfg: Any, max_len: int, cache_bytes: int) -> int:
    """One slot's KV cache: max_len x L x K x H x 2 (k and v) x b."""
    return max_len * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * cache_bytes


def train_activation_bytes(cfg: Any, rows: float, T: int, *, remat: str, compute_bytes: int, logprob_chunk: int,
                           block: int) -> dict[str, float]:
    """Peak activation bytes of one training micro-batch of ``rows`` rows on one chip:

    * saved for the backward pass: ``full`` remat keeps each layer's input (rows*T*D*b*L);
      ``dots`` its matmul outputs (rows*T*((N+2K)H + 2D + 2F)*b*L); ``none`` everything of every
      layer (L x the working set below);
    * one layer's working set while it is recomputed and differentiated:
      rows*T*(4D + 2(N+2K)H + 3F)*b;
    * attention scores in fp32: rows*N*T*T*4 dense, rows*N*block*block*4*2 blocked;
    * log-prob chunk: logprob_chunk*V*4*3 (logits, softmax, their gradient)."""
    D, F, N, K, H, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.head_dim, cfg.num_hidden_layers, cfg.vocab_size)
    b = compute_bytes
    layer = rows * T * (4 * D + 2 * (N + 2 * K) * H + 3 * F) * b
    if remat == "full":
        saved = rows * T * D * b * L
    elif remat == "dots":
        saved = rows * T * ((N + 2 * K) * H + 2 * D + 2 * F) * b * L
    else:
        saved = layer * L
    scores = rows * N * (block * block * 2 if block and T > block else T * T) * 4
    logits = logprob_chunk * V * 4 * 3
    return {"saved": float(saved), "layer": float(layer), "attention": float(scores), "logits": float(logits)}


# ---------------------------------------------------------------------------------------------
# Step time of the rollouts
# ---------------------------------------------------------------------------------------------


def rollout_seconds(*, prompts: int, n: int, slots: int, response_tokens: int, decode_steps: int, tool_turns: int,
                    t_decode_step: float, t_extend: float, t_prefill: float, t_insert: float,
                    prompts_per_prefill: int) -> dict[str, float]:
    """Rollout time of one RL step when every trajectory is ``response_tokens`` long:

    waves = ceil(prompts / floor(slots / n)) (a group's n samples decode together);
    decode = waves x ceil(response_tokens / decode_steps) x decode_steps x t_decode_step;
    extend = waves x tool_turns x t_extend (one extension call per tool turn of a wave);
    prefill = ceil(prompts / prompts_per_prefill) x (t_prefill + t_insert)."""
    per_wave = max(1, slots // max(n, 1))
    waves = math.ceil(prompts / per_wave)
    calls = math.ceil(response_tokens / max(decode_steps, 1))
    return {"decode": waves * calls * decode_steps * t_decode_step, "extend": waves * tool_turns * t_extend,
            "prefill_insert": math.ceil(prompts / max(prompts_per_prefill, 1)) * (t_prefill + t_insert),
            "waves": float(waves)}


# ---------------------------------------------------------------------------------------------
# Searching a knob
# ---------------------------------------------------------------------------------------------


def micro_batch_candidates(rows_per_mini_batch: int, batch_devices: int) -> list[int]:
    """``train.micro_batch_size`` values that split a mini-batch evenly, ascending; those that are
    also multiples of the batch-parallel devices (every device gets whole rows) when there are any."""
    divs = [d for d in range(1, rows_per_mini_batch + 1) if rows_per_mini_batch % d == 0]
    even = [d for d in divs if d % max(batch_devices, 1) == 0]
    return even or divs


def slot_candidates(low: int, high: int, step: int) -> list[int]:
    """Multiples of ``step`` from the first one >= ``low`` up to ``high``, ascending."""
    step = max(step, 1)
    first = max(step, math.ceil(low / step) * step)
    return list(range(first, high + 1, step))


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], bool], seconds: float,
                    known: Optional[dict[int, bool]] = None, guess: Optional[int] = None,
                    predict: Optional[Callable[[], Optional[float]]] = None, predictions: int = 3,
                    clock: Callable[[], float] = time.monotonic) -> tuple[Optional[int], dict[int, bool], bool]:
    """The largest of ``candidates`` with ``fits(c)`` True, assuming that whatever fits, every smaller
    candidate fits too. ``known`` seeds results already measured.

    Each probe compiles, so the search spends few: up to ``predictions`` times it probes the
    candidate at (or just below) a predicted boundary (``guess`` first, then ``predict()``, which
    may use what the probes measured) and then its neighbour on the far side, which settles the
    answer when the prediction was right; otherwise it bisects the bracket. No new probe starts
    after ``seconds``. Returns (largest known to fit or None, every result, whether the search
    finished)."""
    results = dict(known or {})
    cands = sorted(set(candidates))
    lo, hi = -1, len(cands)  # cands[lo] fits (or lo == -1), cands[hi] does not (or hi == len)
    for i, c in enumerate(cands):
        if results.get(c) is True:
            lo = max(lo, i)
        elif results.get(c) is False:
            hi = min(hi, i)
            break
    deadline = clock() + seconds
    used = 0

    def probe(i: int) -> Optional[bool]:
        nonlocal lo, hi
        if clock() > deadline:
            return None
        ok = results[cands[i]] = bool(fits(cands[i]))
        if ok:
            lo = max(lo, i)
        else:
            hi = min(hi, i)
        return ok

    while hi - lo > 1:
        g = guess if used == 0 and guess is not None else (predict() if predict and used < predictions else None)
        if g is not None:
            used += 1
            i = min(max(max((j for j, c in enumerate(cands) if c <= g), default=lo + 1), lo + 1), hi - 1)
            ok = probe(i)
            if ok is None:
                break
            j = i + 1 if ok else i - 1
            if lo < j < hi and probe(j) is None:
                break
            continue
        if probe((lo + hi) // 2) is None:
            break
    return (cands[lo] if lo >= 0 else None), results, hi - lo <= 1


__all__ = ["attention_context", "chip_bytes", "forward_flops", "itemsize", "kv_bytes_per_slot", "largest_fitting",
           "layer_matmul_params", "micro_batch_candidates", "rollout_seconds", "roofline_seconds", "slot_candidates",
           "train_activation_bytes", "train_passes", "update_flops", "update_hbm_bytes"]
