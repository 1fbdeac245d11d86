"""Generated tokens/s of the slot engine against transformers ``generate``."""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from sod_jax import parallel
from sod_jax.bench.timing import best_time, best_time_pair
from sod_jax.models import init_model, load_pretrained, preset, save_pretrained
from sod_jax.rollout import Engine, Request, SamplingParams, generate


def decode_flops_per_token(cfg, mean_len: float) -> float:
    """Forward FLOPs of one decoded token: 2 x the matmul weights (layers and the lm head; the
    embedding lookup is a gather) plus attention over ``mean_len`` cached positions
    (q.k and p.v: 4 x heads x head_dim per position per layer)."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = D * H * (N + 2 * K) + N * H * D + 3 * D * F
    return 2.0 * (L * per_layer + D * V) + 4.0 * L * N * H * mean_len


def matmul_peak_flops(dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square ``n x n`` matmul in ``dtype`` on the default device, measured now (the
    machine's attainable matmul rate under its current load)."""

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2.0 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats)


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import Qwen3ForCausalLM

    cfg = preset(args.preset)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, cfg.vocab_size, rng.randint(args.min_prompt, args.max_prompt + 1)).tolist()
               for _ in range(args.prompts)]
    N = args.new_tokens
    with tempfile.TemporaryDirectory() as d:  # one set of weights for both sides
        save_pretrained(init_model(cfg, seed=0), d)
        # --devices N: the model on N devices (fsdp), so the engine splits its slots over them
        mesh = None
        if args.devices > 1:
            mesh = parallel.make_mesh(1, args.devices, 1, devices=jax.devices()[:args.devices])
        model = load_pretrained(d, mesh=mesh)
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
                return hf.generate(ids, attention_mask=att, max_new_tokens=N, pad_token_id=0, **hf_kw)

        ours_out = generate(engine, reqs)  # also compiles every bucket and the decode call
        theirs_out = run_hf()[:, width:].tolist()
        # Both sides did the same work: every request got N tokens; greedy tokens agree token for token
        # (the fraction of requests whose N tokens are equal; fp32 near-ties may flip one late token).
        same = [o.token_ids == t for o, t in zip(ours_out, theirs_out)]
        check = {"tokens_per_request": sorted({len(o.token_ids) for o in ours_out} | {len(t) for t in theirs_out})}
        if mode == "greedy":
            check["greedy_equal_fraction"] = round(sum(same) / len(same), 3)
        t_ours, t_hf = best_time_pair(lambda: generate(engine, reqs), run_hf, args.repeats)
        if args.trace:  # one more run of ours under the profiler; every block is a named scope
            with jax.profiler.trace(f"{args.trace}/{mode}", create_perfetto_trace=True):
                generate(engine, reqs)
        peak = matmul_peak_flops(model.config.dtype)
        total = len(prompts) * N
        mean_len = float(np.mean([len(p) for p in prompts])) + N / 2  # live length averaged over decoding
        bound = decode_flops_per_token(cfg, mean_len) * total / t_ours / peak
        rows.append({"bench": "rollout", "mode": mode, "prompts": len(prompts), "new_tokens": N,
                     "slots": args.slots, "slot_devices": engine.slot_devices,
                     "slots_per_device": args.slots // engine.slot_devices,
                     "ours": round(total / t_ours, 1), "baseline": round(total / t_hf, 1),
                     "ratio": round(t_hf / t_ours, 2), "unit": "generated tokens/s",
                     "bound_fraction": round(bound, 3), "matmul_peak_gflops": round(peak / 1e9, 1),
                     "baseline_impl": f"transformers {__import__('transformers').__version__} generate (torch "
                                      f"{torch.__version__}, sdpa, batch of {len(prompts)})",
                     "device": jax.devices()[0].platform, **check})
    if args.straggler:
        rows.append(_straggler_row(args, model, prompts))
    return rows


def _straggler_row(args: argparse.Namespace, model, prompts) -> dict:
    """One request generates ``--straggler`` tokens, the others ``--new-tokens`` (greedy): the engine
    with ragged reads and compact decode (the defaults) against the same engine with neither."""

    N, L = args.new_tokens, args.straggler
    reqs = [Request(p, L if i == 0 else N, SamplingParams(greedy=True), seed=i) for i, p in enumerate(prompts)]
    kw = dict(num_slots=args.slots, max_len=max(map(len, prompts)) + L + 1, decode_steps=args.decode_steps,
              prefill_buckets=(32, 64, 128, 256))
    ragged, plain = Engine(model, **kw), Engine(model, tail_slots=0, compact_decode=False, **kw)
    a, b = generate(ragged, reqs), generate(plain, reqs)  # compiles every variant
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(a)
    t_ours, t_base = best_time_pair(lambda: generate(ragged, reqs), lambda: generate(plain, reqs), args.repeats)
    total = L + (len(prompts) - 1) * N
    return {"bench": "rollout", "mode": "straggler", "prompts": len(prompts), "new_tokens": N, "straggler_tokens": L,
            "slots": args.slots, "tail_slots": ragged.tail_slots, "ours": round(total / t_ours, 1),
            "baseline": round(total / t_base, 1), "ratio": round(t_base / t_ours, 2), "unit": "generated tokens/s",
            "baseline_impl": "the same engine decoding every slot over the whole cache (rollout.tail_slots 0, "
                             "rollout.compact_decode false)",
            "device": jax.devices()[0].platform, "greedy_equal_fraction": round(same, 3)}


def add_parser(sub) -> None:
    p = sub.add_parser("rollout", help="slot engine vs transformers generate (higher ratio is better)")
    p.add_argument("--preset", default="cpu-tiny", help="model preset (cpu-tiny: the CPU demo size)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--devices", type=int, default=1,
                   help="load the model on this many devices (e.g. fake CPU devices via XLA_FLAGS="
                        "--xla_force_host_platform_device_count=8): the engine splits its slots over them")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace", default="", metavar="DIR",
                   help="write a jax.profiler trace of one more run of ours per mode to DIR/<mode> (TensorBoard / "
                        "Perfetto); ops are named by block (layer_i/attention, mlp, lm_head, sample)")
    p.add_argument("--straggler", type=int, default=0,
                   help="also time one request of STRAGGLER tokens among the others (greedy): ragged reads and "
                        "compact decode vs every slot decoding over the straggler's length (0: skip)")
    p.set_defaults(fn=run)
