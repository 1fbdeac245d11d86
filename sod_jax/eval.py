"""``python -m sod_jax.eval``: evaluate a checkpoint as a tool-using agent.

    python -m sod_jax.eval --config configs/eval_aime.yaml [section.key=value ...]
    python -m sod_jax.eval --model DIR --files data/aime24.parquet [--n 4] [--out runs/quick]

Every prompt of ``eval.files`` (Open-AgentRL-Eval rows; per-source prompt templates of
``data.prompt_templates``; prompts longer than ``data.max_prompt_length`` tokens are dropped and
counted) is answered ``eval.n`` times by the multi-turn agent (``code_interpreter`` calls run in the
sandbox), sampled at ``eval.temperature`` / ``eval.top_p``, and scored by the reward functions of its
``data_source``. Writes to ``eval.out_dir``: ``generations.jsonl`` (one line per sample),
``summary.json`` and ``summary.md`` (printed at the end): per data_source avg@n, unbiased pass@k,
maj@k, the reference's bootstrap figures, tool calls, tool errors, turns, response length and finish
reasons. Rerunning with the same ``eval.out_dir`` resumes: finished prompts are not regenerated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import jax

from sod_jax import paths
from sod_jax.chat import ChatError, ChatTokenizer
from sod_jax.config import ConfigError, add_config_args, load_config
from sod_jax.data import DataError
from sod_jax.evaluation import runtime
from sod_jax.evaluation.evaluate import EvalError
from sod_jax.models import CheckpointError
from sod_jax.sandbox import SandboxUnavailable
from sod_jax.startup import start_job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    q = p.add_argument_group("quick look (instead of, or on top of, a config file)")
    q.add_argument("--model", default=None, help="HF checkpoint directory (sets model.path)")
    q.add_argument("--files", nargs="+", default=None, metavar="F", help="eval parquet/jsonl files (sets eval.files)")
    q.add_argument("--n", type=int, default=None, help="samples per prompt (sets eval.n; eval.ks are cut to <= n)")
    q.add_argument("--out", default=None, help="output directory (sets eval.out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_config(args) -> Any:
    """The config of the command line: files, then the quick-look flags, then dotted overrides."""

    quick = []
    if args.model:
        quick.append(f"model.path={args.model}")
    if args.files:
        quick.append("eval.files=" + json.dumps(list(args.files)))
    if args.n is not None:
        quick.append(f"eval.n={args.n}")
    if args.out:
        quick.append(f"eval.out_dir={args.out}")
    try:
        cfg = load_config(args.config, quick + list(args.overrides), job="eval")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.n is not None and not any(o.startswith("eval.ks=") for o in args.overrides):
        cfg.eval.ks = sorted({k for k in cfg.eval.ks if k <= args.n} | {1, args.n})
    if args.print_config:
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg


def check_eval_config(cfg: Any) -> None:
    problems = []
    if not cfg.model.path:
        problems.append("model.path is unset: give the HF checkpoint directory to evaluate (--model DIR)")
    elif not Path(cfg.model.path).is_dir():
        problems.append(f"model.path '{cfg.model.path}' is not a directory: download or train the checkpoint "
                        "(e.g. `huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR`) and pass that DIR")
    elif not (Path(cfg.model.path) / "tokenizer.json").is_file():
        problems.append(f"no tokenizer.json in model.path '{cfg.model.path}': copy the tokenizer files next to the weights")
    if not cfg.eval.files:
        problems.append("eval.files is empty: give the eval parquet/jsonl files (--files F ...)")
    for f in cfg.eval.files:
        if not paths.is_file(f):
            problems.append(f"eval file '{f}' (eval.files) does not exist: download it (Open-AgentRL-Eval) or fix the path")
    e = cfg.eval
    if e.n < 1:
        problems.append(f"eval.n must be >= 1, got {e.n}")
    if any(k < 1 or k > e.n for k in e.ks):
        problems.append(f"eval.ks {e.ks} must lie in [1, eval.n={e.n}]")
    if e.max_response_length < 1:
        problems.append(f"eval.max_response_length must be >= 1, got {e.max_response_length}")
    if not 0 < e.top_p <= 1 or e.temperature < 0:
        problems.append(f"eval.temperature must be >= 0 (0: greedy) and eval.top_p in (0, 1], got {e.temperature} "
                        f"and {e.top_p}")
    if problems:
        raise ConfigError("invalid eval config:\n  - " + "\n  - ".join(problems))


def run(cfg: Any, *, progress: bool = True) -> tuple[dict, paths.AnyPath]:
    """Evaluate as the config says; returns (per-source figures, output directory)."""

    check_eval_config(cfg)
    tok = ChatTokenizer.from_dir(cfg.model.path)
    with runtime.build_eval_runtime(cfg, tok, files=cfg.eval.files, seed=cfg.eval.seed) as rt:
        stats = rt.stats
        out = paths.makedirs(cfg.eval.out_dir)  # a local path or a URL
        main_process = jax.process_index() == 0  # several processes share the prompts; one writes
        if main_process:
            (out / "config.yaml").write_text(cfg.to_yaml())
            (out / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
        print(f"eval: {len(rt.rows)} prompts ({stats.get('too_long', 0)} longer than {cfg.data.max_prompt_length} "
              f"tokens dropped) x {cfg.eval.n} samples; {json.dumps(stats.get('by_source', {}))}", file=sys.stderr)
        figures = rt.run(out_dir=str(out), progress=progress)
    return figures, out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    code = start_job(cfg.distributed, cache_dir=cfg.compile.cache_dir, out_dir=cfg.eval.out_dir)
    if code is not None:
        return code

    try:
        _, out = run(cfg, progress=not args.no_progress)
    except (ConfigError, DataError, EvalError, ChatError, CheckpointError, SandboxUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print((out / "summary.md").read_text(), end="")
        print(f"[generations, summary.json and summary.md in {out}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
