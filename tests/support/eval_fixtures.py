"""A tiny model that has memorised tool-using answers to four eval prompts (two math, two code),
trained with our SFT trainer on conversations whose tool outputs come from the real sandbox."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

MATH = [("What is 6 times 7?", "6 * 7", "42"), ("What is 5 times 9?", "5 * 9", "45")]
CODE = [("Read n from stdin and print 2n.", "n = int(input())\nprint(2 * n)", {"inputs": ["3\n", "10\n"], "outputs": ["6\n", "20\n"]}),
        ("Read n from stdin and print n + 1.", "n = int(input())\nprint(n + 1)", {"inputs": ["3\n", "41\n"], "outputs": ["4\n", "42\n"]})]


def eval_rows() -> list[dict]:
    """Open-AgentRL-Eval rows (LiveCodeBench rows carry reward_model / extra_info as JSON strings)."""
    rows = [{"data_source": "AIME2024", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": a}, "extra_info": {"index": i}} for i, (q, _, a) in enumerate(MATH)]
    rows += [{"data_source": "LiveCodeBench_v6", "prompt": [{"role": "user", "content": q}],
              "reward_model": json.dumps({"ground_truth": json.dumps(gt)}), "extra_info": json.dumps({"index": i})}
             for i, (q, _, gt) in enumerate(CODE)]
    return rows


def _call(code: str) -> dict:
    return {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}


async def _tool_outputs(codes: list[str], tool_cfg) -> list[str]:
    """What the agent would show the model for each code: the real sandbox's run through tool_text."""
    from sod_jax.rollout.tools import prepare_code, tool_text
    from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request

    sb = LocalSandbox(LocalSandboxConfig(workers=2))
    try:
        outs = []
        for c in codes:
            r = await sb.run(run_request(prepare_code(c, tool_cfg.extract_code_block, tool_cfg.print_last_expression)))
            outs.append(tool_text(r, tool_cfg.max_output_chars))
        return outs
    finally:
        await sb.close()


def sft_rows(tools: list[dict], tool_cfg) -> list[dict]:
    checks = [f"print({expr})" for _, expr, _ in MATH] + [code.replace("int(input())", "21") for _, code, _ in CODE]
    outs = asyncio.run(_tool_outputs(checks, tool_cfg))
    rows = []
    for (q, _, a), chk, out in zip(MATH, checks, outs):
        rows.append([{"role": "user", "content": q},
                     {"role": "assistant", "content": "<think>\nCompute it with Python.\n</think>\n\n", "tool_calls": [_call(chk)]},
                     {"role": "tool", "content": out},
                     {"role": "assistant", "content": f"<think>\nThe tool says {a}.\n</think>\n\n\\boxed{{{a}}}"}])
    for (q, code, _), chk, out in zip(CODE, checks[len(MATH):], outs[len(MATH):]):
        rows.append([{"role": "user", "content": q},
                     {"role": "assistant", "content": "<think>\nTry it on 21 first.\n</think>\n\n", "tool_calls": [_call(chk)]},
                     {"role": "tool", "content": out},
                     {"role": "assistant", "content": f"<think>\nIt works.\n</think>\n\n```python\n{code}\n```"}])
    return [{"messages": m, "tools": tools, "index": i} for i, m in enumerate(rows)]


def train_memorised_model(out_dir: Path, tokenizer_dir: Path, steps: int = 200) -> tuple[Path, float]:
    """SFT a tiny random Qwen3 on the four conversations until it reproduces them; returns its HF dir
    (tokenizer files included) and the last training loss."""
    from sod_jax.chat import ChatTokenizer, code_interpreter_tool
    from sod_jax.config import load_config
    from sod_jax.models import Qwen3Config, init_model
    from sod_jax.sft.step import prepare_examples
    from sod_jax.sft.trainer import SFTTrainer

    cfg = load_config(overrides=[f"sft.out_dir={out_dir}", "sft.batch_size=4", f"sft.max_steps={steps}",
                                 f"sft.epochs={steps}", "sft.lr=1e-2", "sft.warmup_ratio=0.05", "sft.min_lr_ratio=0.1",
                                 "sft.max_length=1024", "model.logprob_chunk=256", "logging.plots=false"], job="sft")
    tok = ChatTokenizer.from_dir(tokenizer_dir)
    exs, _ = prepare_examples(sft_rows([code_interpreter_tool(cfg.tool)], cfg.tool), tok, max_length=1024)
    arch = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, rope_theta=10000.0, eos_token_id=tok.eos_id,
                       dtype="float32", param_dtype="float32", remat="none")
    trainer = SFTTrainer(cfg, init_model(arch, seed=0), exs, tokenizer_dir=str(tokenizer_dir), progress=False)
    res = trainer.run()
    return res.model_dir, res.final_loss
