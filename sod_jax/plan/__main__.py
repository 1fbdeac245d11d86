"""``python -m sod_jax.plan --config FILE --topology v5e-8 [section.key=value ...]``: will this config
fit that slice, which knob to turn, and about how long a step takes.

Compiles the config's real programs with abstract inputs (no weights loaded, nothing allocated)
for the target's devices: for RL configs the update (largest length bucket, the config's mini- and
micro-batches, teacher included) and the rollout engine's sampling copy, prefill, insert, decode
and extension programs; for SFT configs the SFT step. Reads XLA's memory analysis per chip and
adds up what stays resident together; when something does not fit it compiles smaller
``train.micro_batch_size`` / ``rollout.num_slots`` (``sft.micro_batch_rows``) values to find the
largest that fit. Step times are estimates (roofline of FLOPs and bytes against the chip's
published peak and HBM bandwidth; the formulas are printed).

Targets: TPU accelerator types (v5e-8, v5p-16, v6e-8, v4-32; v4/v5p count TensorCores, so v4-32 is
16 chips), topologies (v5e:2x4, v4:2x2x4), GPU counts (8xH100: an arithmetic estimate unless
those GPUs are on this host) and cpu[:N] (this host's CPU devices). TPU targets need libtpu
(``jax[tpu]`` of the installed jax version, in requirements-dev.txt) but no TPU.

The architecture comes from ``config.json`` in ``model.path`` / ``teacher.path``; when there is none,
from a preset named in the path (``checkpoints/qwen3-0.6b-sft`` -> qwen3-0.6b) or ``--student-preset`` /
``--teacher-preset``. Exit codes: 0 fits, 3 does not fit, 2 a config or target problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python -m sod_jax.plan --config configs/sod_qwen3_0.6b.yaml "
                                       "--topology v5e-8 train.micro_batch_size=8 rollout.num_slots=64")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file (repeatable; later files override earlier ones)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, as for the other CLIs")
    p.add_argument("--topology", required=True, metavar="TARGET",
                   help="v5e-8, v5p-16, v6e-8, v4-32, v5e:2x4, v4:2x2x4, 8xH100 or cpu[:N]")
    p.add_argument("--job", choices=("auto", "train", "sft"), default="auto",
                   help="what the config is for (auto: sft when the files set an sft section and no RL section)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--search", action="store_true",
                   help="find the largest micro-batch and slot count that fit even when the config fits")
    p.add_argument("--search-seconds", type=float, default=900.0,
                   help="no new compile of a search starts after this many seconds (per knob; default 900)")
    p.add_argument("--all-programs", action="store_true",
                   help="compile every engine program of the run, not only the largest of each kind")
    p.add_argument("--only", choices=("update", "rollouts"), default=None,
                   help="plan only the RL update or only the rollouts (e.g. one compile set per process)")
    p.add_argument("--skip", action="append", default=[], metavar="PROGRAM",
                   choices=("sampling_copy", "prefill", "insert", "decode", "extend"),
                   help="an engine program not to compile (repeatable; the report says it was left out)")
    p.add_argument("--response-tokens", type=int, default=None,
                   help="mean response tokens per trajectory for the step-time estimate (default: the maximum)")
    p.add_argument("--student-preset", default=None, help="student architecture preset (e.g. qwen3-0.6b)")
    p.add_argument("--teacher-preset", default=None, help="teacher architecture preset (e.g. qwen3-4b)")
    p.add_argument("--verbose", "-v", action="store_true", help="log each compile to stderr as it starts and ends")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def detect_job(paths: list[str]) -> str:
    """``sft`` when the YAML files have an ``sft`` section and none of the RL ones, else ``train``."""
    import yaml

    keys: set = set()
    for f in paths:
        try:
            data = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            keys |= set(data)
    return "sft" if "sft" in keys and not keys & {"algo", "teacher", "rollout"} else "train"


def _choose_platforms(target: str) -> None:
    """CPU for JAX's own platform unless planning for local GPUs: the TPU planner uses the
    compile-only TPU client, and an installed libtpu would otherwise try to open a TPU."""
    if "x" in target.lower() and target.lower().split("x", 1)[0].strip().isdigit():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _choose_platforms(args.topology)
    from sod_jax.config import ConfigError, load_config

    job = detect_job(args.config) if args.job == "auto" else args.job
    try:
        cfg = load_config(args.config, args.overrides, job=job)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", force=True)
        logging.getLogger("sod_jax.plan").setLevel(logging.INFO)
    from sod_jax.plan.build import PlanError
    from sod_jax.plan.core import plan_config
    from sod_jax.plan.hardware import TargetError
    from sod_jax.plan.report import format_text

    try:
        report = plan_config(cfg, args.topology, job=job, student_preset=args.student_preset,
                             teacher_preset=args.teacher_preset, search=args.search,
                             search_seconds=args.search_seconds, all_programs=args.all_programs, skip=tuple(args.skip),
                             phases=(args.only,) if args.only else ("update", "rollouts"),
                             response_tokens=args.response_tokens, source=" + ".join(args.config) or "defaults")
    except (PlanError, TargetError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else format_text(report), flush=True)
    return 0 if report.fits or report.fits is None else 3


if __name__ == "__main__":
    raise SystemExit(main())
