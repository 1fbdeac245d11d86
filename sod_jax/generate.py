"""``python -m sod_jax.generate``: chat with a Qwen3 checkpoint through the rollout engine.

Renders the chat template (thinking mode on unless ``--no-thinking``), generates ``--n`` samples
with the slot engine and prints each one. With ``--tools`` the model gets the ``code_interpreter``
tool and runs the full multi-turn loop: its calls execute in the isolated local sandbox and the
outputs come back as tool turns, up to ``--max-turns`` assistant turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from sod_jax.chat import ChatError, ChatTokenizer
from sod_jax.models import CheckpointError, load_pretrained
from sod_jax.rollout import Engine, EngineError, Request, SamplingParams, generate
from sod_jax.rollout.agent import Agent, AgentConfig, AgentRequest, EnginePolicy
from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, SandboxUnavailable
from sod_jax.startup import start_job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer.json, "
                                                   "tokenizer_config.json)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--tools", action="store_true", help="run the multi-turn tool loop with the local sandbox")
    p.add_argument("--max-turns", type=int, default=16, help="assistant turns with --tools")
    p.add_argument("--allow-unconfined", action="store_true",
                   help="with --tools: run code without isolation if bubblewrap is missing (trusted code only)")
    p.add_argument("--no-thinking", action="store_true", help="render with enable_thinking=False")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="argmax decoding")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1.0: off)")
    p.add_argument("--top-k", type=int, default=-1, help="top-k (-1: off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens to generate per sample")
    p.add_argument("--n", type=int, default=1, help="samples (share one prefill)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (same seed, same samples)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = start_job(None)
    if code is not None:
        return code

    try:
        tok = ChatTokenizer.from_dir(args.model)
        model = load_pretrained(args.model, dtype=args.dtype)
        sampling = (SamplingParams(greedy=True) if args.greedy else
                    SamplingParams(temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k))
    except (ChatError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    if args.tools:
        return _run_agent(args, tok, model, sampling, messages)
    prompt_ids = tok.encode_chat(messages, None, add_generation_prompt=True, enable_thinking=not args.no_thinking)
    max_len = len(prompt_ids) + args.max_new_tokens + 1
    try:
        engine = Engine(model, num_slots=max(args.n, 1), max_len=max_len, stop_ids=tok.stop_ids, tokenizer=tok)
        t0 = time.perf_counter()
        outs = generate(engine, [Request(prompt_ids, args.max_new_tokens, sampling, args.seed, args.n)])
        dt = time.perf_counter() - t0
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for o in outs:
        text = tok.decode(o.token_ids, skip_special_tokens=False)
        if args.json:
            print(json.dumps({"sample": o.sample_index, "text": text, "finish_reason": o.finish_reason,
                              "tokens": len(o.token_ids),
                              "mean_logprob": sum(o.logprobs) / max(len(o.logprobs), 1)}, ensure_ascii=False))
            continue
        if args.n > 1:
            print(f"--- sample {o.sample_index} ({o.finish_reason}, {len(o.token_ids)} tokens)")
        print(text)
    total = sum(len(o.token_ids) for o in outs)
    print(f"[{total} tokens in {dt:.2f} s, {total / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _run_agent(args, tok, model, sampling, messages) -> int:
    """``--tools``: the TIR loop with the local sandbox."""

    try:
        sandbox = LocalSandbox(LocalSandboxConfig(workers=max(args.n, 1), allow_unconfined=args.allow_unconfined))
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = AgentConfig(max_assistant_turns=args.max_turns, max_response_tokens=args.max_new_tokens,
                      enable_thinking=not args.no_thinking)
    agent = Agent(tok, sandbox, cfg)
    prompt_len = len(agent.prompt_ids(messages))
    engine = Engine(model, num_slots=max(args.n, 1), max_len=prompt_len + args.max_new_tokens + 2,
                    stop_ids=tok.stop_ids)
    t0 = time.perf_counter()
    trajs = asyncio.run(agent.run(EnginePolicy(engine, sampling), [AgentRequest(messages, args.n, args.seed)]))
    dt = time.perf_counter() - t0
    for t in trajs:
        if args.json:
            print(json.dumps({"sample": t.sample_index, "text": t.text, "finish_reason": t.finish_reason,
                              "turns": t.num_turns, "tool_calls": t.num_tool_calls, "tool_errors": t.num_tool_errors,
                              "tool_invalid_calls": t.num_invalid_calls,
                              "tokens": len(t.response_ids), "model_tokens": sum(t.response_mask)},
                             ensure_ascii=False))
            continue
        if args.n > 1:
            print(f"--- sample {t.sample_index} ({t.finish_reason}, {t.num_turns} turns, {t.num_tool_calls} tool calls)")
        print(t.text)
    total = sum(sum(t.response_mask) for t in trajs)
    print(f"[{total} generated tokens in {dt:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
