"""The whole RL update against the same update in PyTorch eager (transformers Qwen3), and MFU."""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sod_jax import optim
from sod_jax.bench.timing import best_time, best_time_pair
from sod_jax.config import OptimConfig
from sod_jax.models import load_pretrained, preset
from sod_jax.rl.update import RLBatch, UpdateSpec, build_update, init_train_state


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

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats)


def run(args: argparse.Namespace) -> list[dict]:
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

    # Both sides start from the same random weights (transformers models, loaded into ours), so their
    # first updates must agree: the bench reports both losses.

    s_torch, t_torch = hf_qwen3(s_cfg, 0), hf_qwen3(t_cfg, 1)
    runtime = dict(scan_layers=True, remat="none", attention_block=blk)
    with tempfile.TemporaryDirectory() as tmp:
        s_torch.save_pretrained(f"{tmp}/s")
        t_torch.save_pretrained(f"{tmp}/t")
        s_graph, s_params = nnx.split(load_pretrained(f"{tmp}/s", **runtime))
        t_graph, t_params = nnx.split(load_pretrained(f"{tmp}/t", **runtime))

    # --- ours
    tx, _ = optim.make_optimizer(optim.OptimizerSpec.from_rl(OptimConfig(lr=1e-6), 1000))
    state = {"s": init_train_state(tx, s_params, seed=0)}
    spec = UpdateSpec(mode="sod", mini_batches=M, num_groups=B // 4, logprob_chunk=1024)
    update = build_update(spec, tx, s_graph, t_graph)
    batch = RLBatch(jnp.asarray(ids), jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T)),
                    jnp.asarray(resp), jnp.asarray(rewards), jnp.asarray(groups))

    def ours_step():
        state["s"], met = update(state["s"], t_params, batch)
        return jax.block_until_ready(met)

    first_ours = float(ours_step()["pg_loss"])  # also compiles
    # --- PyTorch eager, identical shapes and math; the two run alternately
    torch_update = TorchUpdate(s_torch, t_torch, lr=1e-6)
    first_base = float(np.mean([m["pg_loss"] for m in torch_update(ids, resp, rewards, groups, M)["metrics"]]))
    ours, base = best_time_pair(ours_step, lambda: torch_update(ids, resp, rewards, groups, M), args.repeats)

    tokens = B * T
    flops = _update_flops(s_cfg, t_cfg, tokens, T)
    peak = _matmul_peak()
    return [{"bench": "train-step", "B": B, "T": T, "mini_batches": M, "attention_block": blk,
             "ours": round(tokens / ours), "baseline": round(tokens / base), "ratio": round(base / ours, 2), "unit": "tokens/s",
             "ours_s": round(ours, 4), "baseline_s": round(base, 4), "mfu": round(flops / ours / peak, 3),
             "baseline_mfu": round(flops / base / peak, 3), "update_gflop": round(flops / 1e9, 2),
             "matmul_peak_gflops": round(peak / 1e9, 1), "device": jax.devices()[0].platform,
             "first_pg_loss_ours": first_ours, "first_pg_loss_baseline": first_base}]


class TorchUpdate:
    """The SOD update written independently in PyTorch eager over transformers' Qwen3: the
    train-step bench's baseline and the golden reference of ``tests/test_train_step.py``.

    Same objective as :mod:`sod_jax.rl.update` (DESIGN §1.1): log-probs of ``softmax(logits / T)``,
    step weights by segment sums, GRPO with the unbiased group std, PPO clip-higher + dual-clip,
    token mean over each mini-batch (mini-batch ``j`` = rows ``r % M == j``), global-norm clip,
    AdamW; a mini-batch with a non-finite loss or grad norm is skipped.
    """

    def __init__(self, student, teacher, lr: float = 1e-6, weight_decay: float = 0.01, grad_clip: float = 1.0,
                 b1: float = 0.9, b2: float = 0.999):
        import torch

        self.torch, self.student, self.teacher = torch, student, teacher.eval()
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(b1, b2), weight_decay=weight_decay,
                                     eps=1e-8)

    def logp(self, model, x, temperature: float):
        """Token-space log-probs ``[B, T]`` (0 at position 0)."""
        torch = self.torch
        logits = model(x).logits[:, :-1].float() / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
        return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)

    def __call__(self, ids, resp, rewards, groups, mini_batches: int, temperature: float = 1.0,
                 eps: float = 1e-6, delta: float = 0.2, adv_eps: float = 1e-6, opd_coef: float = 1.0,
                 clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float = 3.0) -> dict:
        """One update on numpy inputs (``ids``/``resp`` ``[B, T]``, ``rewards``/``groups`` ``[B]``);
        returns numpy ``old_logp``, ``teacher_logp``, ``weights``, ``adv`` and per-mini-batch metrics."""
        torch, M = self.torch, mini_batches
        ids_t = torch.tensor(ids, dtype=torch.long)
        m = torch.tensor(resp, dtype=torch.float32)
        r = torch.tensor(rewards, dtype=torch.float32)
        g = torch.tensor(groups, dtype=torch.long)
        B, T = ids_t.shape
        rows = [torch.arange(j, B, M) for j in range(M)]
        with torch.no_grad():
            old = torch.zeros(B, T)
            q = torch.zeros(B, T)
            for sl in rows:
                old[sl] = self.logp(self.student, ids_t[sl], temperature)
                q[sl] = self.logp(self.teacher, ids_t[sl], temperature)
            # step weights: runs of m == 1 numbered per row, d_k by index_add, telescoped ratio
            mb = m.bool()
            starts = mb & ~torch.nn.functional.pad(mb[:, :-1], (1, 0))
            sid = torch.cumsum(starts.long(), 1) * mb.long()
            S = T // 2 + 2
            flat = (sid + torch.arange(B)[:, None] * S).flatten()
            gap = ((old - q).abs() * m).flatten()
            lens = torch.zeros(B * S).index_add_(0, flat, m.flatten()).view(B, S)
            d = (torch.zeros(B * S).index_add_(0, flat, gap).view(B, S) / lens.clamp(min=1))
            w = torch.minimum((d[:, 1:2] + eps) / (d + eps), torch.tensor(1.0 + delta))
            w[:, 1] = 1.0
            wt = w.gather(1, sid) * m
            A = torch.zeros(B)
            for gid in torch.unique(g):
                sel = g == gid
                if int(sel.sum()) > 1:
                    A[sel] = (r[sel] - r[sel].mean()) / (r[sel].std() + adv_eps)
                else:
                    A[sel] = r[sel] / (1.0 + adv_eps)
            adv = A[:, None] * m + opd_coef * wt * (q - old) * m
        metrics = []
        for sl in rows:
            lp = self.logp(self.student, ids_t[sl], temperature)
            ratio = torch.exp(torch.clamp(lp - old[sl], -20, 20))
            a, mm = adv[sl], m[sl]
            unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high)
            loss_tok = torch.maximum(unclipped, clipped)
            took_clip = clipped > unclipped
            took_dual = (a < 0) & (loss_tok > -a * dual_clip)
            loss_tok = torch.where(a < 0, torch.minimum(loss_tok, -a * dual_clip), loss_tok)
            n = mm.sum()
            loss = (loss_tok * mm).sum() / n
            self.opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
            if torch.isfinite(gn) and torch.isfinite(loss):
                self.opt.step()
            on = mm > 0
            metrics.append({"pg_loss": float(loss.detach()), "grad_norm": float(gn),
                            "clip_frac": float(took_clip[on].float().mean()),
                            "clip_frac_low": float((took_clip & (ratio < 1))[on].float().mean()),
                            "clip_frac_high": float((took_clip & (ratio > 1))[on].float().mean()),
                            "dual_clip_frac": float(took_dual[on].float().mean()),
                            "ratio_mean": float(ratio[on].mean()), "ratio_max": float(ratio[on].max()),
                            "ratio_min": float(ratio[on].min())})
        return {"old_logp": old.numpy(), "teacher_logp": q.numpy(), "weights": wt.numpy(), "adv": adv.numpy(),
                "metrics": metrics}


def hf_qwen3(c, seed: int = 0):
    """A random transformers Qwen3ForCausalLM with the architecture of our :class:`Qwen3Config` ``c``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_theta=c.rope_theta, attn_implementation="sdpa"))


def add_parser(sub) -> None:
    p = sub.add_parser("train-step", help="whole RL update vs PyTorch eager, and MFU (higher ratio is better)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention-block", type=int, default=128,
                    help="causal attention block (model.attention_block; 0 = dense [T, T])")
    p.set_defaults(fn=run)
