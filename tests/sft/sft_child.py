"""A ``python -m sod_jax.sft`` run that is interrupted at a step boundary (test support).

``python tests/sft/sft_child.py CONFIG {kill9,sigterm} STEP``: ``sigterm`` sends SIGTERM to
itself after step STEP (the run must save, stop and exit 0); ``kill9`` waits until the checkpoint
of step ``STEP - 2`` is finalized on disk, then SIGKILLs itself after step STEP (mid-run, like a
preempted VM)."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sod_jax.config import load_config  # noqa: E402
from sod_jax.sft.cli import run  # noqa: E402
from sod_jax.sft.trainer import SFTHook  # noqa: E402


class Interrupt(SFTHook):
    def __init__(self, how: str, step: int, ckpt_dir: Path):
        self.how, self.step, self.ckpt_dir = how, step, ckpt_dir

    def on_step(self, trainer, step: int) -> None:
        if step != self.step:
            return
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        deadline = time.time() + 300
        while not (self.ckpt_dir / str(step - 2)).is_dir() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    config, how, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config([config], job="sft")
    run(cfg, hooks=[Interrupt(how, step, Path(cfg.sft.out_dir) / "checkpoints")], progress=False)
