"""Benchmarks, each against a baseline run in the same process.

``python -m sod_jax.bench NAME [options]`` prints one JSON object per result line:
``{"bench": ..., "ours": ..., "baseline": ..., "ratio": ...}``. For speed benches ``ratio`` is our
speed over the baseline's (higher is better); for ``memory`` it is our bytes over the baseline's
(lower is better).

Benches:
  sandbox  executions/s and p50/p99 latency of ``print(1)`` at concurrency 8: the isolated local
           executor and the same behind ``sandbox serve`` over HTTP, against a bare subprocess.
  rollout  generated tokens/s of the slot engine against transformers ``generate`` on the same
           random model, same prompts, same number of new tokens, greedy and
           sampled (top-p 0.9); default preset cpu-tiny (4 layers, d=128, V=512).
  train-step   tokens/s of the whole RL update (student fwd + teacher fwd + student fwd/bwd + loss +
           AdamW) against the same update in PyTorch eager (transformers Qwen3), plus MFU against a
           measured matmul peak. Preset: student 256/4 layers, teacher 384/6, vocab 4096, B=16, T=512.
  sod-weights  jitted segment-sum SOD step weights versus a per-token Python loop (the reference's
           approach) on B=64, T=8192 with ~8 steps per row.
  memory   compiled temporary memory of chunked sampled-token log-probs (value and gradient)
           versus the naive [T, V] log-softmax gather, at Qwen3's vocabulary; and of one layer's
           blocked causal attention (forward and backward) versus dense [T, T] scores.
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
    rows.append(_attention_memory(T, args.attention_block))
    return rows


def _attention_memory(T: int, block: int) -> dict:
    """Compiled temp bytes of one layer's causal attention, forward and backward, at Qwen3-1.7B's
    head layout (16 query heads, 8 kv heads, head dim 128): blocked versus dense ``[T, T]`` scores."""
    import jax
    import jax.numpy as jnp

    from sod_jax.models.blocked_attention import blocked_attention
    from sod_jax.models.qwen3 import attention, attention_mask_from

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


def _time(fn: Callable, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds (fn must block until done)."""
    import time

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_pair(ours: Callable, baseline: Callable, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` wall times of two functions run alternately, so both see the same
    machine conditions (a shared machine's speed drifts between runs)."""
    import time

    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, baseline)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def loop_step_weights(s, q, m, eps: float, delta: float):
    """Per-token Python loop over rows and tokens (how the reference computes SOD weights)."""
    import numpy as np

    B, T = m.shape
    out = np.zeros((B, T), np.float32)
    for b in range(B):
        sums, lens, spans = [], [], []
        inside = False
        for t in range(T):
            if m[b, t]:
                if not inside:
                    sums.append(0.0)
                    lens.append(0)
                    spans.append([t, t])
                    inside = True
                sums[-1] += abs(s[b, t] - q[b, t])
                lens[-1] += 1
                spans[-1][1] = t + 1
            else:
                inside = False
        prod = 1.0
        prev = None
        for k, (a, e) in enumerate(spans):
            d = sums[k] / lens[k]
            if k == 0:
                w = 1.0
            else:
                prod *= (prev + eps) / (d + eps)
                w = min(prod, 1.0 + delta)
            prev = d
            for t in range(a, e):
                out[b, t] = w
    return out


def bench_sod_weights(args: argparse.Namespace) -> list[dict]:
    import jax
    import numpy as np

    from sod_jax.algo.sod import step_weights

    B, T, K = args.batch, args.seq, args.steps
    rng = np.random.RandomState(0)
    s = -rng.exponential(1.0, (B, T)).astype(np.float32)
    q = -rng.exponential(1.0, (B, T)).astype(np.float32)
    m = np.zeros((B, T), np.int32)
    for b in range(B):  # K assistant turns separated by tool outputs, random lengths
        cuts = np.sort(rng.choice(np.arange(1, T), 2 * K - 1, replace=False))
        bounds = np.concatenate([[0], cuts, [T]])
        for k in range(K):
            m[b, bounds[2 * k]:bounds[2 * k + 1]] = 1
    s_d, q_d, m_d = map(jax.device_put, (s, q, m))
    fn = lambda: step_weights(s_d, q_d, m_d, 1e-6, 0.2).block_until_ready()  # noqa: E731
    fn()  # compile
    ours = _time(fn, args.repeats)
    ref = loop_step_weights(s, q, m, 1e-6, 0.2)
    base = _time(lambda: loop_step_weights(s, q, m, 1e-6, 0.2), 1)
    np.testing.assert_allclose(np.asarray(step_weights(s_d, q_d, m_d, 1e-6, 0.2)), ref, rtol=1e-5, atol=1e-6)
    return [{"bench": "sod-weights", "B": B, "T": T, "steps_per_row": K, "ours": round(B * T / ours),
             "baseline": round(B * T / base), "ratio": round(base / ours, 1), "unit": "tokens/s",
             "ours_ms": round(ours * 1e3, 3), "baseline_ms": round(base * 1e3, 1),
             "device": jax.devices()[0].platform}]


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
    return 2 * n**3 / _time(lambda: f(a).block_until_ready(), repeats)


def bench_train_step(args: argparse.Namespace) -> list[dict]:
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
    ours, base = _time_pair(ours_step, torch_step, args.repeats)

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


def bench_rollout(args: argparse.Namespace) -> list[dict]:
    import tempfile

    import jax
    import numpy as np
    import torch
    from transformers import Qwen3ForCausalLM

    from sod_jax.models import init_model, load_pretrained, preset, save_pretrained
    from sod_jax.rollout import Engine, Request, SamplingParams

    cfg = preset(args.preset)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, cfg.vocab_size, rng.randint(args.min_prompt, args.max_prompt + 1)).tolist()
               for _ in range(args.prompts)]
    N = args.new_tokens
    with tempfile.TemporaryDirectory() as d:  # one set of weights for both sides
        save_pretrained(init_model(cfg, seed=0), d)
        model = load_pretrained(d)
        hf = Qwen3ForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None  # both sides generate exactly N tokens
    max_len = max(map(len, prompts)) + N + 1
    engine = Engine(model, num_slots=args.slots, max_len=max_len, decode_steps=args.decode_steps,
                    prefill_buckets=(32, 64, 128, 256))
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers expects for batched generation
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    rows = []
    for mode, sp, hf_kw in (("greedy", SamplingParams(greedy=True), dict(do_sample=False)),
                            ("sampled", SamplingParams(temperature=1.0, top_p=0.9),
                             dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0))):
        reqs = [Request(p, N, sp, seed=i) for i, p in enumerate(prompts)]

        def run_hf():
            with torch.no_grad():
                hf.generate(ids, attention_mask=att, max_new_tokens=N, pad_token_id=0, **hf_kw)

        engine.generate(reqs)  # compile every bucket and the decode call
        run_hf()
        t_ours, t_hf = _time_pair(lambda: engine.generate(reqs), run_hf, args.repeats)
        total = len(prompts) * N
        rows.append({"bench": "rollout", "mode": mode, "prompts": len(prompts), "new_tokens": N,
                     "slots": args.slots, "ours": round(total / t_ours, 1), "baseline": round(total / t_hf, 1),
                     "ratio": round(t_hf / t_ours, 2), "unit": "generated tokens/s",
                     "baseline_impl": f"transformers {__import__('transformers').__version__} generate (torch "
                                      f"{torch.__version__}, sdpa, batch of {len(prompts)})",
                     "device": jax.devices()[0].platform})
    return rows


def bench_sandbox(args: argparse.Namespace) -> list[dict]:
    import asyncio
    import sys
    import time

    import numpy as np

    from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request
    from sod_jax.sandbox.fusion import FusionSandbox
    from sod_jax.sandbox.server import spawn

    N, C = args.runs, args.concurrency

    async def measure(one) -> tuple[float, list[float]]:
        sem = asyncio.Semaphore(C)
        lat: list[float] = []

        async def timed():
            async with sem:
                t = time.perf_counter()
                await one()
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*[timed() for _ in range(min(C, N))])  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[timed() for _ in range(N)])
        return N / (time.perf_counter() - t0), lat

    async def bare():
        p = await asyncio.create_subprocess_exec(sys.executable, "-E", "-s", "-B", "-c", "print(1)",
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await p.communicate()

    local = LocalSandbox(LocalSandboxConfig(workers=C))

    async def via_local():
        r = await local.run(run_request("print(1)"))
        assert r["status"] == "Success", r

    server, url = spawn(workers=C)
    rows = []
    try:
        async def run_all():
            client = FusionSandbox(url, max_concurrency=C)

            async def via_http():
                r = await client.run(run_request("print(1)"))
                assert r["status"] == "Success", r

            out = {"bare": await measure(bare), "local": await measure(via_local), "server": await measure(via_http)}
            await client.close()
            return out

        res = asyncio.run(run_all())
    finally:
        server.terminate()
        server.wait(10)
    base_rate, base_lat = res["bare"]
    for name in ("local", "server"):
        rate, lat = res[name]
        rows.append({"bench": "sandbox", "backend": name, "concurrency": C, "runs": N, "ours": round(rate, 1),
                     "baseline": round(base_rate, 1), "ratio": round(rate / base_rate, 3), "unit": "executions/s",
                     "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
                     "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1),
                     "baseline_p50_ms": round(float(np.percentile(base_lat, 50)) * 1e3, 1),
                     "baseline_p99_ms": round(float(np.percentile(base_lat, 99)) * 1e3, 1),
                     "isolation_overhead_p50_ms": round(float(np.percentile(lat, 50) - np.percentile(base_lat, 50)) * 1e3, 1),
                     "confined": local.confined})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sod_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    sb = sub.add_parser("sandbox", help="isolated executor and HTTP server vs a bare subprocess")
    sb.add_argument("--runs", type=int, default=200)
    sb.add_argument("--concurrency", type=int, default=8)
    sb.set_defaults(fn=bench_sandbox)
    ro = sub.add_parser("rollout", help="slot engine vs transformers generate (higher ratio is better)")
    ro.add_argument("--preset", default="cpu-tiny", help="model preset (cpu-tiny: the CPU demo size)")
    ro.add_argument("--prompts", type=int, default=16)
    ro.add_argument("--min-prompt", type=int, default=32)
    ro.add_argument("--max-prompt", type=int, default=128)
    ro.add_argument("--new-tokens", type=int, default=128)
    ro.add_argument("--slots", type=int, default=16)
    ro.add_argument("--decode-steps", type=int, default=32)
    ro.add_argument("--repeats", type=int, default=5)
    ro.set_defaults(fn=bench_rollout)
    ts = sub.add_parser("train-step", help="whole RL update vs PyTorch eager, and MFU (higher ratio is better)")
    ts.add_argument("--batch", type=int, default=16)
    ts.add_argument("--seq", type=int, default=512)
    ts.add_argument("--mini-batches", type=int, default=4)
    ts.add_argument("--repeats", type=int, default=3)
    ts.add_argument("--attention-block", type=int, default=128,
                    help="causal attention block (model.attention_block; 0 = dense [T, T])")
    ts.set_defaults(fn=bench_train_step)
    sw = sub.add_parser("sod-weights", help="jitted step weights vs a per-token Python loop (higher ratio is better)")
    sw.add_argument("--batch", type=int, default=64)
    sw.add_argument("--seq", type=int, default=8192)
    sw.add_argument("--steps", type=int, default=8, help="assistant turns per row")
    sw.add_argument("--repeats", type=int, default=20)
    sw.set_defaults(fn=bench_sod_weights)
    mem = sub.add_parser("memory", help="chunked log-prob memory vs naive [T, V] (lower ratio is better)")
    mem.add_argument("--seq", type=int, default=8192, help="sequence length T")
    mem.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen3: 151936)")
    mem.add_argument("--hidden", type=int, default=64, help="hidden size D")
    mem.add_argument("--chunk", type=int, default=256, help="tokens per log-prob chunk")
    mem.add_argument("--attention-block", type=int, default=512, help="blocked attention block (model.attention_block)")
    mem.set_defaults(fn=bench_memory)
    args = parser.parse_args(argv)
    for row in args.fn(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
