"""The shared loop skeleton: the order of its hook points, stops at step boundaries, the checkpoint
hook's cadence and exact resume on a real orbax checkpoint, and a signal during the first
evaluation; and that the RL and SFT loops are this one class."""

import os
import signal

import jax.numpy as jnp
import numpy as np

from sod_jax.checkpoint import Checkpointer
from sod_jax.loop import CheckpointHook, Hook, Loop, PreemptionHook
from sod_jax.rl.trainer import Trainer
from sod_jax.sft.trainer import SFTHook, SFTTrainer


class Counter(Loop):
    """x <- x * 1.5 + step per step; evaluation every ``eval_every`` steps; records kept in memory."""

    def __init__(self, total, eval_every=0, hooks=(), signal_at_eval=None):
        super().__init__(total_steps=total, hooks=hooks, progress=False)
        self.x = jnp.ones((3,), jnp.float32)
        self.eval_every, self.signal_at_eval = eval_every, signal_at_eval
        self.events, self.records = [], []

    def train_step(self, step):
        self.x = self.x * 1.5 + step
        self.events.append(("train", step))
        return {"x0": float(self.x[0])}

    def eval_due(self, step):
        return bool(self.eval_every) and step % self.eval_every == 0

    def evaluate(self, step):
        self.events.append(("eval", step))
        if self.signal_at_eval == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"x_sum": float(self.x.sum())}

    def end_of_step(self, step):
        self.records.append({"step": step, **self.step_metrics.pop(step, {})})

    def finish(self):
        self.events.append(("finish", self.step))
        return self.step

    def checkpoint_state(self):
        return {"x": self.x}

    def checkpoint_extra(self, step):
        return {"step": step}

    def restore(self, step, state, extra):
        self.x, self.step = state["x"], extra["step"]


class Log(Hook):
    def __init__(self, name, events, stop_at=None):
        self.name, self.events, self.stop_at = name, events, stop_at

    def on_start(self, loop):
        self.events.append((self.name, "start", loop.step))

    def on_step(self, loop, step):
        self.events.append((self.name, "step", step))
        if step == self.stop_at:
            loop.request_stop("test")

    def on_eval(self, loop, step, summary):
        self.events.append((self.name, "eval", step))
        return False

    def on_end(self, loop):
        self.events.append((self.name, "end", loop.step))


def test_rl_and_sft_loops_are_the_one_skeleton():
    assert issubclass(Trainer, Loop) and issubclass(SFTTrainer, Loop) and SFTHook is Hook
    for cls in (Trainer, SFTTrainer):
        assert cls.run is Loop.run and cls.run_eval is Loop.run_eval and cls.request_stop is Loop.request_stop


def test_hook_points_run_in_order_and_a_stop_ends_at_the_boundary():
    events = []
    loop = Counter(10, eval_every=2, hooks=[Log("a", events, stop_at=3), Log("b", events)])
    loop.events = events
    assert loop.run() == 3
    assert events == [
        ("a", "start", 0), ("b", "start", 0),
        ("eval", 0), ("a", "eval", 0), ("b", "eval", 0),
        ("train", 1), ("a", "step", 1), ("b", "step", 1),
        ("train", 2), ("eval", 2), ("a", "eval", 2), ("b", "eval", 2), ("a", "step", 2), ("b", "step", 2),
        ("train", 3), ("a", "step", 3), ("b", "step", 3),  # every hook still sees the stopping step
        ("finish", 3), ("a", "end", 3), ("b", "end", 3)]
    assert [r["step"] for r in loop.records] == [1, 2, 3] and loop.stop_reason == "test"


def test_checkpoint_cadence_and_exact_resume(tmp_path):
    def make(total):
        ck = Checkpointer(tmp_path / "ckpt", save_every=3, keep=10)
        return Counter(total, hooks=[CheckpointHook(ck, save_every=3, timing_key="time/checkpoint")]), ck

    straight, _ = make(7)
    straight.run()
    assert Checkpointer(tmp_path / "ckpt", save_every=3, keep=10).all_steps() == [3, 6, 7]  # every 3 and the last
    assert {"checkpoint_blocking_s", "time/checkpoint"} <= set(straight.records[2]) and "time/checkpoint" not in \
        straight.records[0]
    # Resume from step 6 (the 7 is dropped as if the run had died before it) and run to 9.
    for d in (tmp_path / "ckpt").iterdir():
        if d.name == "7":
            import shutil

            shutil.rmtree(d)
    resumed, _ = make(9)
    resumed.run()
    assert [r["step"] for r in resumed.records] == [7, 8, 9]
    ref = Counter(9)
    ref.run()
    np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(ref.x))


def test_a_signal_during_the_first_evaluation_saves_the_next_step_and_stops(tmp_path):
    ck = Checkpointer(tmp_path / "ckpt", save_every=100, keep=2)
    loop = Counter(50, eval_every=100, signal_at_eval=0,
                   hooks=[PreemptionHook(), CheckpointHook(ck, save_every=100)])
    previous = signal.getsignal(signal.SIGTERM)
    assert loop.run() == 1
    assert loop.stop_reason == "preempted" and not loop.stop_export
    assert Checkpointer(tmp_path / "ckpt", save_every=100, keep=2).all_steps() == [1]
    assert signal.getsignal(signal.SIGTERM) == previous  # the guard is left on the way out
