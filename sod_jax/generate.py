"""``python -m sod_jax.generate``: chat with a Qwen3 checkpoint through the rollout engine.

Renders the chat template (thinking mode on unless ``--no-thinking``), generates ``--n`` samples
with the slot engine and prints each one. With ``--tools`` the ``code_interpreter`` tool schema is
in the prompt and every tool call the model writes is listed after its text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer.json, "
                                                   "tokenizer_config.json)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--tools", action="store_true", help="offer the code_interpreter tool and list the calls made")
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
    from sod_jax.chat import CODE_INTERPRETER_TOOL, ChatError, ChatTokenizer, parse_tool_calls
    from sod_jax.models import CheckpointError, load_pretrained
    from sod_jax.rollout import Engine, EngineError, Request, SamplingParams

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
    tools = [CODE_INTERPRETER_TOOL] if args.tools else None
    prompt_ids = tok.encode_chat(messages, tools, add_generation_prompt=True, enable_thinking=not args.no_thinking)
    max_len = len(prompt_ids) + args.max_new_tokens + 1
    try:
        engine = Engine(model, num_slots=max(args.n, 1), max_len=max_len, stop_ids=tok.stop_ids, tokenizer=tok)
        t0 = time.perf_counter()
        outs = engine.generate([Request(prompt_ids, args.max_new_tokens, sampling, args.seed, args.n)])
        dt = time.perf_counter() - t0
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for o in outs:
        text = tok.decode(o.token_ids, skip_special_tokens=False)
        calls = parse_tool_calls(text) if args.tools else None
        if args.json:
            row = {"sample": o.sample_index, "text": text, "finish_reason": o.finish_reason,
                   "tokens": len(o.token_ids), "mean_logprob": sum(o.logprobs) / max(len(o.logprobs), 1)}
            if calls is not None:
                row["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls.calls]
                row["tool_call_errors"] = [{"kind": e.kind, "message": e.message} for e in calls.errors]
            print(json.dumps(row, ensure_ascii=False))
            continue
        if args.n > 1:
            print(f"--- sample {o.sample_index} ({o.finish_reason}, {len(o.token_ids)} tokens)")
        print(text)
        if calls is not None:
            for c in calls.calls:
                print(f"[tool call] {c.name}({json.dumps(c.arguments, ensure_ascii=False)})")
            for e in calls.errors:
                print(f"[malformed tool call: {e.kind}] {e.message}")
    total = sum(len(o.token_ids) for o in outs)
    print(f"[{total} tokens in {dt:.2f} s, {total / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
