"""One whole RL step of the CPU demo's shape (tool-using rollouts in the local sandbox, rewards, the
compiled update), timed through :class:`sod_jax.rl.trainer.Trainer` and split into its parts.

Student and teacher are random ``cpu-tiny`` models (4 layers, d=128) with the demo's tokenizer, on
the demo's prompts and config (``configs/demo_chain.yaml``): the cost of a step does not depend on what
the weights know, only on how many tokens the rollouts produce, so ``--max-response`` bounds it.
The first step (compilation) is reported apart; the split is the mean over the later steps.
There is no external baseline for a whole step; ``baseline`` is the update alone, so ``ratio`` is
the fraction of the step the update takes (the rest is rollouts, tools and rewards).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sod_jax.config import load_config
from sod_jax.demo import TOKENIZER_DIR
from sod_jax.models import save_pretrained
from sod_jax.models.presets import preset as make_preset
from sod_jax.models.qwen3 import init_model
from sod_jax.rl.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def _models(root: Path, preset: str) -> tuple[Path, Path]:
    dirs = []
    for name, seed in (("student", 0), ("teacher", 1)):
        d = root / name
        save_pretrained(init_model(make_preset(preset, dtype="float32", param_dtype="float32"), seed=seed), d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(TOKENIZER_DIR) / f, d / f)
        dirs.append(d)
    return dirs[0], dirs[1]


def run(args: argparse.Namespace) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="sod_bench_rl_"))
    try:
        student, teacher = _models(root, args.preset)
        overrides = [f"model.path={student}", f"teacher.path={teacher}", f"train.out_dir={root / 'run'}",
                     f"algo.name={args.algo}", f"train.total_steps={args.steps + 1}", "train.eval_every=0",
                     "checkpoint.resume=false", f"checkpoint.save_every={args.steps + 10}", "logging.plots=false",
                     f"rollout.max_response_length={args.max_response}",
                     f"train.length_buckets=[{args.max_response + 64}]"]
        cfg = load_config(REPO / "configs" / "demo_chain.yaml", overrides)
        # The trainer's progress lines go to stderr: this command's stdout is JSON lines only.
        with contextlib.redirect_stdout(sys.stderr):
            trainer = Trainer(cfg, progress=False)
            trainer.preflight()
            trainer.setup()
            trainer.loader_iter = iter(trainer.loader)
            walls, rows = [], []
            for step in range(1, args.steps + 2):
                t0 = time.perf_counter()
                m = trainer.train_step(step)
                walls.append(time.perf_counter() - t0)
                rows.append(m)
            trainer.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    later = rows[1:]
    step_s = float(np.mean(walls[1:]))
    split = {k: float(np.mean([r[k] for r in later])) for k in ("time/rollout", "time/reward", "time/update")}
    out = {"bench": "rl-step", "unit": "s/step", "ours": round(step_s, 4), "baseline": round(split["time/update"], 4),
           "ratio": round(split["time/update"] / step_s, 4), "first_step_s": round(walls[0], 2),
           **{k: round(v, 4) for k, v in split.items()},
           "other_s": round(step_s - sum(split.values()), 4),
           "trajectories": cfg.train.prompts_per_step * cfg.rollout.n,
           "generated_tokens": float(np.mean([r["generated_tokens"] for r in later])),
           "tool_calls_mean": float(np.mean([r["tool_calls_mean"] for r in later])),
           "preset": args.preset, "algo": args.algo, "steps": args.steps}
    return [out]


def add_parser(sub) -> None:
    p = sub.add_parser("rl-step", help="one whole RL step of the CPU demo's shape, split into its parts")
    p.add_argument("--preset", default="cpu-tiny", help="student and teacher architecture (random weights)")
    p.add_argument("--algo", default="sod")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    p.add_argument("--max-response", type=int, default=192, help="rollout.max_response_length")
    p.set_defaults(fn=run)
