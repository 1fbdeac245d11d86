"""Generated tokens/s of the slot engine against transformers ``generate``."""

from __future__ import annotations

import argparse

from sod_jax.bench.timing import best_time_pair


def run(args: argparse.Namespace) -> list[dict]:
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
        t_ours, t_hf = best_time_pair(lambda: engine.generate(reqs), run_hf, args.repeats)
        total = len(prompts) * N
        rows.append({"bench": "rollout", "mode": mode, "prompts": len(prompts), "new_tokens": N,
                     "slots": args.slots, "ours": round(total / t_ours, 1), "baseline": round(total / t_hf, 1),
                     "ratio": round(t_hf / t_ours, 2), "unit": "generated tokens/s",
                     "baseline_impl": f"transformers {__import__('transformers').__version__} generate (torch "
                                      f"{torch.__version__}, sdpa, batch of {len(prompts)})",
                     "device": jax.devices()[0].platform})
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("rollout", help="slot engine vs transformers generate (higher ratio is better)")
    p.add_argument("--preset", default="cpu-tiny", help="model preset (cpu-tiny: the CPU demo size)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(fn=run)
