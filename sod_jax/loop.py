"""The one training-loop skeleton, shared by the RL loop (:class:`sod_jax.rl.trainer.Trainer`) and
the SFT loop (:class:`sod_jax.sft.trainer.SFTTrainer`), and the hooks both use.

A :class:`Loop` runs steps ``step + 1 .. total_steps``. Each iteration, in this order:

1. ``train_step(step)``: the subclass's work (rollouts, rewards and one update; or one packed SFT
   step). What it returns (host metrics, or None when they are fetched later) opens the step's record
   ``loop.step_metrics[step]``;
2. a held-out evaluation when ``eval_due(step)``; hooks see it in ``on_eval`` (True stops the run);
3. every hook's ``on_step`` in list order: e.g. :class:`PreemptionHook` (a signal becomes a stop at
   this boundary), :class:`CheckpointHook` (periodic, last-step and stopping saves), the SFT accuracy
   hook. Hooks add host figures to the step's record with ``loop.add_metrics``;
4. ``end_of_step(step)``: the subclass writes the step's record (through its ``RunDir``) and prints.

The loop ends after the last step or at the first step boundary after ``request_stop``; then
``finish()`` (the subclass's final evaluation, export, plots) and every hook's ``on_end``. A
progress bar with rate and ETA runs on process 0 (``progress=True``); ``say`` prints through it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from tqdm import tqdm

from sod_jax.checkpoint import Checkpointer, PreemptionGuard, abstract_like

log = logging.getLogger(__name__)


class Hook:
    """Override what you need. Every method runs on every process, at step boundaries."""

    def on_start(self, loop: "Loop") -> None:
        """Before the first step (and before a step-0 evaluation); e.g. restore a checkpoint."""

    def on_step(self, loop: "Loop", step: int) -> None:
        """After step ``step`` (1-based) and its evaluation, if any; ``loop``'s state is that step's result."""

    def on_metrics(self, loop: "Loop", step: int, metrics: dict) -> None:
        """The host metrics of ``step`` (for the SFT loop, fetched one step late)."""

    def on_eval(self, loop: "Loop", step: int, summary: dict) -> bool:
        """After a held-out evaluation at ``step``; return True to stop the run."""
        return False

    def on_export(self, loop: "Loop", step: int, path: Any) -> None:
        """After an HF checkpoint of the weights at ``step`` was written to ``path``."""

    def on_end(self, loop: "Loop") -> None:
        """After the last step and ``finish()``."""


class Loop:
    """The skeleton; subclasses implement :meth:`train_step` and whichever of :meth:`eval_due`,
    :meth:`evaluate`, :meth:`end_of_step`, :meth:`finish` and the checkpoint methods they need."""

    desc = "train"  # the progress bar's label

    def __init__(self, *, total_steps: int = 0, hooks: Sequence[Hook] = (), progress: bool = True,
                 is_main: bool = True):
        self.total_steps = total_steps
        self.hooks = list(hooks)
        self.progress, self.is_main = progress, is_main
        self.step = 0  # steps done (a restored checkpoint moves it)
        self.step_metrics: dict[int, dict] = {}  # the records of steps not written yet
        self.stop_reason: Optional[str] = None
        self.stop_export = True  # False: skip the final export (a preempted run)
        self.bar: Optional[tqdm] = None

    # -- what a loop implements ----------------------------------------------------------------------

    def train_step(self, step: int) -> Optional[dict]:
        """Run step ``step``; return its host metrics, or None when the loop records them itself later."""
        raise NotImplementedError

    def eval_due(self, step: int) -> bool:
        return False

    def evaluate(self, step: int) -> Optional[dict]:
        return None

    def end_of_step(self, step: int) -> None:
        """Write the step's record, print its line."""

    def finish(self) -> Any:
        """After the last step (or a stop): final evaluation, export, plots; the value ``run`` returns."""

    # Checkpoints (used by CheckpointHook).
    def checkpoint_state(self) -> Any:
        """The pytree of device arrays a checkpoint holds."""
        raise NotImplementedError

    def checkpoint_extra(self, step: int) -> dict:
        """JSON-able host state saved next to the arrays (config, data position, history)."""
        return {}

    def restore(self, step: int, state: Any, extra: dict) -> None:
        """Continue from a restored checkpoint of ``step``."""
        raise NotImplementedError

    # -- for hooks -----------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def request_stop(self, reason: str = "hook", export: bool = True) -> None:
        """End the run at this step boundary (``export=False``: skip the final export, e.g. on preemption)."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_export = reason, export

    def add_metrics(self, step: int, **values: Any) -> None:
        """Add host figures (e.g. checkpoint time) to ``step``'s record."""
        self.step_metrics.setdefault(step, {}).update(values)

    def say(self, text: str) -> None:
        """One line on process 0, through the progress bar when there is one."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def run_eval(self, step: int) -> Optional[dict]:
        summary = self.evaluate(step)
        if summary is not None:
            for h in self.hooks:
                if h.on_eval(self, step, summary):
                    self.request_stop("hook")
        return summary

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> Any:
        for h in self.hooks:
            h.on_start(self)
        if self.progress and self.is_main:
            self.bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step",
                            dynamic_ncols=True)
        try:
            if self.step == 0 and self.eval_due(0) and self.stop_reason is None:
                self.run_eval(0)
            while self.step < self.total_steps and self.stop_reason is None:
                step = self.step + 1
                metrics = self.train_step(step)
                self.step = step
                if metrics is not None:
                    self.add_metrics(step, **metrics)
                if self.eval_due(step):
                    self.run_eval(step)
                for h in self.hooks:
                    h.on_step(self, step)
                self.end_of_step(step)
                if self.bar is not None:
                    self.bar.update(1)
            result = self.finish()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        for h in self.hooks:
            h.on_end(self)
        return result


class PreemptionHook(Hook):
    """SIGTERM / SIGINT (TPU maintenance, a scheduler, Ctrl-C) become a stop at the next step
    boundary, with a checkpoint of that step when a :class:`CheckpointHook` follows this hook. The
    guard is entered before the loop's first evaluation, so a signal during it is not lost; a second
    signal exits at once (:class:`sod_jax.checkpoint.PreemptionGuard`)."""

    def __init__(self, guard: Optional[PreemptionGuard] = None):
        self.guard = guard if guard is not None else PreemptionGuard()

    def on_start(self, loop: Loop) -> None:
        self.guard.__enter__()
        # A signal during set-up or compilation (a run enters the guard at start-up): stop before step 1.
        if self.guard.stop_now():
            loop.request_stop("preempted", export=False)

    def on_step(self, loop: Loop, step: int) -> None:
        if self.guard.stop_now():  # agreed across processes: every host stops at the same step
            loop.request_stop("preempted", export=False)

    def on_end(self, loop: Loop) -> None:
        self.guard.__exit__(None, None, None)


class CheckpointHook(Hook):
    """Orbax checkpoints of ``loop.checkpoint_state()``: with ``resume`` the newest readable one is
    restored at start (straight into the state's shardings), then a save every ``save_every`` steps,
    at the last step and when the loop is stopping. The seconds each save blocked the loop are added
    to the step's record as ``checkpoint_blocking_s`` (and the whole save call as ``timing_key``
    when given)."""

    def __init__(self, ckpt: Checkpointer, *, save_every: int, resume: bool = True,
                 timing_key: Optional[str] = None):
        self.ckpt, self.save_every, self.resume, self.timing_key = ckpt, save_every, resume, timing_key
        self.restored_step: Optional[int] = None

    def on_start(self, loop: Loop) -> None:
        if not self.resume:
            return
        got = self.ckpt.restore(abstract_like(loop.checkpoint_state()))
        if got is None:
            log.info("no checkpoint in %s: starting from step 0", self.ckpt.directory)
            return
        step, state, extra = got
        loop.restore(step, state, extra)
        self.restored_step = step

    def on_step(self, loop: Loop, step: int) -> None:
        due = (self.save_every > 0 and step % self.save_every == 0) or step >= loop.total_steps or loop.stopping
        if not due:
            return
        t0 = time.perf_counter()
        if self.ckpt.save(step, loop.checkpoint_state(), extra=loop.checkpoint_extra(step), force=True):
            figures = {"checkpoint_blocking_s": self.ckpt.last_save_blocking_s}
            if self.timing_key:
                figures[self.timing_key] = time.perf_counter() - t0
            loop.add_metrics(step, **figures)
        if loop.stop_reason == "preempted":
            loop.say(f"stopping at step {step} on a signal; checkpoint saved in {self.ckpt.directory}, rerun the "
                     "same command to resume")

    def on_end(self, loop: Loop) -> None:
        self.ckpt.wait()
        self.ckpt.close()


__all__ = ["CheckpointHook", "Hook", "Loop", "PreemptionHook"]
