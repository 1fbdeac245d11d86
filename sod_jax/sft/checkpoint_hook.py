"""Checkpoint, resume and preemption for the SFT loop, as an :class:`sod_jax.sft.trainer.SFTHook`.

- start: with ``checkpoint.resume`` the newest readable checkpoint in ``checkpoint.dir`` (default
  ``<sft.out_dir>/checkpoints``) is restored straight into the trainer's state shardings; the step
  counter is the data position (the SFT plan is a pure function of the seed and the step), so the
  run continues with the next planned batch. ``metrics.jsonl`` loses records past the restored step
  (they are recomputed identically); history and the early-stopping state come from the checkpoint.
- every ``checkpoint.save_every`` steps and at the last step: an async save of ``SFTState`` plus
  ``extra`` (resolved config, architecture, metric history, early-stopping state); at a step with a
  held-out evaluation the save follows the evaluation, so a resumed run's early stopping continues
  exactly. The seconds each save blocked the loop are added to that step's metrics (or the next
  step's, for a save after an evaluation) as ``checkpoint_blocking_s``.
- SIGTERM / SIGINT: the step in progress ends, a checkpoint of it is saved, the run stops without
  the final HF export and the CLI exits 0; a second signal exits at once (see
  :class:`sod_jax.checkpoint.PreemptionGuard` for the time bound).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import jax

from sod_jax.checkpoint import Checkpointer, PreemptionGuard, abstract_like, config_differences, trim_jsonl
from sod_jax.models.hf import config_to_hf
from sod_jax.sft.trainer import SFTHook, SFTState

log = logging.getLogger(__name__)


class SFTCheckpointHook(SFTHook):
    """Orbax checkpoints of the SFT state, auto-resume and preemption handling (``cfg.checkpoint``)."""

    def __init__(self, cfg: Any, guard: Optional[PreemptionGuard] = None):
        self.cfg = cfg
        self.ckpt = Checkpointer.from_config(cfg.checkpoint, cfg.sft.out_dir)
        self.guard = guard if guard is not None else PreemptionGuard()
        self._own_guard = guard is None
        self.restored_step: Optional[int] = None
        self._after_eval: Optional[tuple[int, bool]] = None  # (step, force) of a save waiting for its eval

    # -- hook points -------------------------------------------------------------------------------

    def on_start(self, trainer: Any) -> None:
        if self._own_guard:
            self.guard.__enter__()
        if not self.cfg.checkpoint.resume:
            return
        target = abstract_like(trainer.state)
        got = self.ckpt.restore(target)
        if got is None:
            log.info("no checkpoint in %s: starting from step 0", self.ckpt.directory)
            return
        step, state, extra = got
        trainer.set_state(SFTState(*state))
        self.restored_step = step
        trainer.history = [r for r in extra.get("history", []) if r.get("step", 0) <= step]
        trainer.best_val_loss = extra.get("best_val_loss")
        trainer._since_best = int(extra.get("since_best", 0))  # early-stopping patience counter
        if jax.process_index() == 0:
            dropped = trim_jsonl(Path(trainer.out_dir) / "metrics.jsonl", step)
        else:
            dropped = 0
        diff = config_differences(extra.get("config", {}), self.cfg.to_dict())
        if diff:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(diff))
        log.info("resumed SFT from checkpoint step %d of %d in %s (%d later metric records dropped)", step,
                 trainer.plan.total_steps, self.ckpt.directory, dropped)

    def on_step(self, trainer: Any, step: int) -> None:
        stopping = self.guard.stop_now()
        force = stopping or step >= trainer.plan.total_steps
        s = trainer.sft
        if trainer.val_batches and s.eval_every and step % s.eval_every == 0:
            # A held-out evaluation of this same state follows: save after it (on_eval), so the
            # checkpoint's early-stopping state includes it. The state is unchanged until then.
            self._after_eval = (step, force)
        else:
            self._save(trainer, step, force)
        if stopping:
            log.warning("stop requested: saving the checkpoint of step %d in %s, then stopping", step,
                        self.ckpt.directory)
            trainer.request_stop("preempted", export=False)

    def on_eval(self, trainer: Any, step: int, metrics: dict) -> bool:
        if self._after_eval is not None and self._after_eval[0] == step:
            self._save(trainer, step, self._after_eval[1])
            self._after_eval = None
        return False

    def _save(self, trainer: Any, step: int, force: bool) -> None:
        if self.ckpt.save(step, trainer.state, extra=self._extra(trainer), force=force):
            # Reported with this step's record, or with the next one when this one is already written
            # (a save that waited for the step's evaluation).
            written = bool(trainer.history) and trainer.history[-1].get("step", -1) >= step
            trainer.step_metrics.setdefault(step + 1 if written else step, {})["checkpoint_blocking_s"] = \
                self.ckpt.last_save_blocking_s

    def on_end(self, trainer: Any) -> None:
        self.ckpt.close()
        if self._own_guard:
            self.guard.__exit__(None, None, None)

    # -- what a checkpoint carries besides the arrays -----------------------------------------------

    def _extra(self, trainer: Any) -> dict:
        # The step's own metrics are still on the device (fetched one step late); the history holds
        # the steps before it. Records past the restored step are dropped on resume.

        return {"config": self.cfg.to_dict(), "hf_config": config_to_hf(trainer.model_config, self.cfg.model.param_dtype),
                "history": list(trainer.history),
                "best_val_loss": trainer.best_val_loss, "since_best": trainer._since_best,
                "total_steps": trainer.plan.total_steps}
