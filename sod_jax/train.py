"""``python -m sod_jax.train --config FILE [section.key=value ...]``: SOD / OPD / GRPO / OPSD RL.

The loop is :class:`sod_jax.rl.trainer.Trainer`; this CLI resolves the config, runs the checks that
need no compute (paths, teacher compatibility, data, sandbox), then trains, resuming from the run
directory's newest checkpoint. Exit codes: 0 done (or stopped cleanly on SIGTERM/SIGINT after a
checkpoint), 2 a configuration or set-up problem (the message says what to change).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sod_jax.config import add_config_args, config_from_args
from sod_jax.rl.trainer import SetupError, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sod_jax.train",
        description="RL of a tool-using student: prompts -> multi-turn Python-tool rollouts -> rewards -> one "
                    "compiled update (grpo, opd, sod, gated_opd, opsd_gt, opsd_hint, iw_opd), with periodic "
                    "eval and checkpoints. Writes config.yaml, metrics.jsonl, eval.jsonl, step_weights.jsonl, "
                    "plots/ and checkpoints/ under train.out_dir, and resumes from it.",
        epilog="Example: python -m sod_jax.train --config configs/demo.yaml algo.name=opd train.total_steps=20")
    add_config_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="No progress bar (one line per step instead).")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)

    if getattr(cfg, "distributed", None) is not None and getattr(cfg.distributed, "num_processes", None):
        from sod_jax import parallel

        d = cfg.distributed
        parallel.initialize_distributed(d.coordinator, d.num_processes, d.process_id)
    trainer = Trainer(cfg, progress=not args.no_progress)
    try:
        trainer.preflight()
        trainer.setup()
        result = trainer.run()
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        trainer.close()
        return 2
    trainer.close()
    if trainer.is_main:
        _report(trainer, result)
    return 0


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
