"""The whole RL update against the same update in PyTorch eager (transformers Qwen3), and MFU."""

from __future__ import annotations

import argparse
from typing import Callable

from sod_jax.bench.timing import best_time, best_time_pair


def _update_flops(student, teacher, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one update: student fwd (old log-probs) + teacher fwd + student fwd + bwd."""

    def fwd_per_token(c) -> float:
        D, F, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        proj = D * H * (N + 2 * K) + N * H * D + 3 * D * F
        attn = seq * N * H  # QK^T and PV over the causal half: seq / 2 keys per query on average
        return 2.0 * (L * (proj + attn) + D * V)

    return tokens * (fwd_per_token(student) * 4 + fwd_per_token(teacher))


def _matmul_peak(repeats: int = 5, n: int = 2048) -> float:
    """Measured fp32 matmul FLOP/s of this device (the MFU denominator)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats)


def run(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sod_jax.config import OptimConfig
    from sod_jax.models import init_model, preset
    from sod_jax.train_step import RLBatch, UpdateSpec, build_update, init_optimizer, make_optimizer

    B, T, M = args.batch, args.seq, args.mini_batches
    blk = args.attention_block
    s_cfg = preset("bench-student", scan_layers=True, remat="none", attention_block=blk)
    t_cfg = preset("bench-teacher", scan_layers=True, remat="none", attention_block=blk)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, s_cfg.vocab_size, (B, T)).astype(np.int32)
    resp = np.zeros((B, T), np.int32)  # prompt T/4, then 3 assistant turns split by tool outputs
    for a, e in ((T // 4, T // 2), (T // 2 + T // 16, 3 * T // 4), (3 * T // 4 + T // 16, T)):
        resp[:, a:e] = 1
    rewards = rng.rand(B).astype(np.float32)
    groups = np.repeat(np.arange(B // 4), 4).astype(np.int32)

    # --- ours
    s_graph, s_params = nnx.split(init_model(s_cfg, seed=0))
    t_graph, t_params = nnx.split(init_model(t_cfg, seed=1))
    tx = make_optimizer(OptimConfig(lr=1e-6))
    opt = init_optimizer(tx, s_params)
    spec = UpdateSpec(mode="sod", mini_batches=M, num_groups=B // 4, logprob_chunk=1024)
    update = build_update(spec, tx, s_graph, t_graph)
    batch = RLBatch(jnp.asarray(ids), jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T)),
                    jnp.asarray(resp), jnp.asarray(rewards), jnp.asarray(groups))
    state = {"p": s_params, "o": opt}

    def ours_step():
        state["p"], state["o"], met = update(state["p"], state["o"], t_params, batch)
        jax.block_until_ready(met)

    ours_step()  # compile
    # --- PyTorch eager, identical shapes and math; the two run alternately
    torch_step = _torch_update_step(s_cfg, t_cfg, ids, resp, rewards, groups, M)
    ours, base = best_time_pair(ours_step, torch_step, args.repeats)

    tokens = B * T
    flops = _update_flops(s_cfg, t_cfg, tokens, T)
    peak = _matmul_peak()
    return [{"bench": "train-step", "B": B, "T": T, "mini_batches": M, "attention_block": blk,
             "ours": round(tokens / ours), "baseline": round(tokens / base), "ratio": round(base / ours, 2), "unit": "tokens/s",
             "ours_s": round(ours, 4), "baseline_s": round(base, 4), "mfu": round(flops / ours / peak, 3),
             "baseline_mfu": round(flops / base / peak, 3), "update_gflop": round(flops / 1e9, 2),
             "matmul_peak_gflops": round(peak / 1e9, 1), "device": jax.devices()[0].platform}]


def _torch_update_step(s_cfg, t_cfg, ids, resp, rewards, groups, M: int) -> Callable:
    """The same SOD update in PyTorch eager with transformers' Qwen3 (the baseline), warmed up."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)

    def hf(c):
        return Qwen3ForCausalLM(Qwen3Config(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
            tie_word_embeddings=c.tie_word_embeddings, rope_theta=c.rope_theta, attn_implementation="sdpa"))

    student, teacher = hf(s_cfg), hf(t_cfg).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    ids_t = torch.tensor(ids, dtype=torch.long)
    m = torch.tensor(resp, dtype=torch.float32)
    r = torch.tensor(rewards)
    g = torch.tensor(groups, dtype=torch.long)
    B, T = ids_t.shape

    def logp(model, x):
        lp = torch.log_softmax(model(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]
        return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)

    def step():
        with torch.no_grad():
            old = torch.cat([logp(student, c) for c in ids_t.chunk(M)])
            q = torch.cat([logp(teacher, c) for c in ids_t.chunk(M)])
            # step weights (vectorised segment sums), GRPO and SOD advantages
            mb = m.bool()
            starts = mb & ~torch.nn.functional.pad(mb[:, :-1], (1, 0))
            sid = torch.cumsum(starts.long(), 1) * mb.long()
            S = T // 2 + 2
            flat = (sid + torch.arange(B)[:, None] * S).flatten()
            gap = ((old - q).abs() * m).flatten()
            d = torch.zeros(B * S).index_add_(0, flat, gap) / torch.zeros(B * S).index_add_(0, flat, m.flatten()).clamp(min=1)
            d = d.view(B, S)
            w = torch.minimum((d[:, 1:2] + 1e-6) / (d + 1e-6), torch.tensor(1.2))
            w[:, 1] = 1.0
            wt = w.gather(1, sid) * m
            n_g = int(g.max()) + 1
            mean = torch.zeros(n_g).index_add_(0, g, r) / torch.bincount(g, minlength=n_g)
            std = torch.stack([r[g == i].std() for i in range(n_g)])
            A = (r - mean[g]) / (std[g] + 1e-6)
            adv = A[:, None] * m + wt * (q - old) * m
        for i in range(M):
            sl = slice(i * B // M, (i + 1) * B // M)
            lp = logp(student, ids_t[sl])
            ratio = torch.exp(torch.clamp(lp - old[sl], -20, 20))
            a = adv[sl]
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
            loss = torch.where(a < 0, torch.minimum(loss, -a * 3.0), loss)
            loss = (loss * m[sl]).sum() / m[sl].sum()
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            if torch.isfinite(gn):
                opt.step()

    step()  # warm-up
    return step


def add_parser(sub) -> None:
    p = sub.add_parser("train-step", help="whole RL update vs PyTorch eager, and MFU (higher ratio is better)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention-block", type=int, default=128,
                    help="causal attention block (model.attention_block; 0 = dense [T, T])")
    p.set_defaults(fn=run)
