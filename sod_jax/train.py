"""``python -m sod_jax.train --config FILE [section.key=value ...]``: SOD / OPD / GRPO / OPSD RL.

The loop is :class:`sod_jax.rl.trainer.Trainer`; this CLI resolves the config, runs the checks that
need no compute (paths, teacher compatibility, data, sandbox), then trains, resuming from the run
directory's newest checkpoint. Exit codes: 0 done (or stopped cleanly on SIGTERM/SIGINT after a
checkpoint), 2 a configuration or set-up problem, found before any weights load where it can be (one
``error: ...`` line saying what to change; no traceback). The persistent compilation cache is on
(``compile.cache_dir``, default ``<train.out_dir>/xla_cache``), so a restarted run does not compile
again.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from sod_jax import parallel
from sod_jax.config import add_config_args, add_plan_arg, config_from_args
from sod_jax.models.hf import CheckpointError
from sod_jax.rl.trainer import SetupError, Trainer
from sod_jax.sandbox.protocol import SandboxUnavailable
from sod_jax.startup import start_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sod_jax.train",
        description="RL of a tool-using student: prompts -> multi-turn Python-tool rollouts -> rewards -> one "
                    "compiled update (grpo, opd, sod, gated_opd, opsd_gt, opsd_hint, iw_opd), with periodic "
                    "eval and checkpoints. Writes config.yaml, metrics.jsonl, eval.jsonl, step_weights.jsonl, "
                    "plots/ and checkpoints/ under train.out_dir, and resumes from it.",
        epilog="Example: python -m sod_jax.train --config configs/demo.yaml algo.name=opd train.total_steps=20")
    add_config_args(parser)
    add_plan_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="No progress bar (one line per step instead).")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    code = start_job(cfg.distributed, cache_dir=cfg.compile.cache_dir, out_dir=cfg.train.out_dir)
    if code is not None:
        return code

    trainer = Trainer(cfg, progress=not args.no_progress)
    try:
        # Set-up: checks, then models, engine, update. A failure here is a configuration or
        # environment problem: one line and exit 2. Errors of the training steps surface as they are.
        try:
            trainer.preflight()
            trainer.setup()
        except SETUP_ERRORS as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        try:
            result = trainer.run()
        except SetupError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            # A collective failed: a peer died or stopped answering. Say which, then leave at once (the
            # shutdown barrier would wait for the dead peer); finalized checkpoints stay valid.
            print(f"error: process {jax.process_index()} lost {parallel.lost_peers()} during a collective "
                  f"({one_line(e)[:200]}); restart every process with the same command to resume from the last "
                  "checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
    finally:
        trainer.close()
    if trainer.is_main:
        _report(trainer, result)
    return 0


# What set-up may raise for a problem the user fixes: the trainer's checks, a bad checkpoint directory,
# the engine's limits (EngineError), data and tokenizer errors (ValueError subclasses), no sandbox.
SETUP_ERRORS = (SetupError, CheckpointError, ValueError, SandboxUnavailable)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a multi-line message's lines joined with '; ')."""
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip(" -")]
    return "; ".join(lines) or type(e).__name__


def _report(trainer, result: dict) -> None:
    first, last = result.get("first_eval"), result.get("last_eval")
    lines = [f"done: {result['steps']} steps; run directory {trainer.out}"]
    for name, ev in (("before", first), ("after", last)):
        if not ev:
            continue
        for src, d in ev.items():
            if isinstance(d, dict) and "acc" in d:
                extra = ""
                if "tool_calls_mean" in d:
                    extra = f", tool calls {d['tool_calls_mean']:.2f}, tool error rate {d.get('tool_error_rate', 0):.3f}"
                if "turns_mean" in d:
                    extra += f", turns {d['turns_mean']:.2f}"
                lines.append(f"  held-out {src} accuracy {name}: {d['acc']:.3f}{extra}")
        if "heldout_kl" in ev:
            lines.append(f"  held-out student-teacher KL {name}: {ev['heldout_kl']:.4f}")
    lines.append(f"  plots: {trainer.out / 'plots'}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
