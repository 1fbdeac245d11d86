"""Held-out tool-using accuracy during SFT, and stopping by it (``sft.accuracy_*``).

The held-out loss says little about whether a model can *run* the task: one miscopied digit in a
tool call makes the whole answer wrong. :class:`AccuracyHook` measures what RL will see: every
``sft.accuracy_every`` steps the current weights drive the real agent loop (rollout engine,
sandbox, hermes tool calls) on the first ``sft.accuracy_prompts`` rows of ``sft.accuracy_files``,
and the reward registry scores the answers. The set-up is
:func:`sod_jax.evaluation.runtime.build_eval_runtime`, the one the eval CLI and the RL loop use.
Each measurement is a line of ``accuracy.jsonl``.

What a measurement can trigger:

* ``sft.snapshot_accuracy_band = [low, high]``: the first checkpoint inside the band is exported to
  ``sft.snapshot_out`` and training goes on (one run gives a weaker and a stronger model, e.g. the
  demo's student and teacher);
* ``sft.stop_accuracy_at_least`` / ``sft.stop_accuracy_band``: the run stops, and its final export
  (``<out_dir>/model``) holds exactly the measured weights;
* the best measurement so far is always exported to ``<out_dir>/best`` (the fallback when no
  target is reached).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

from sod_jax.evaluation import runtime
from sod_jax.sft.trainer import SFTHook
from sod_jax.tracking import append_jsonl, read_jsonl, write_jsonl


def accuracy_decision(acc: float, sft: Any, snapshot_taken: bool) -> tuple[bool, Optional[str]]:
    """(export the in-band snapshot now?, stop reason or None) for a measured accuracy ``acc``."""
    band = sft.snapshot_accuracy_band
    snap = bool(band) and not snapshot_taken and band[0] <= acc <= band[1]
    stop = None
    if sft.stop_accuracy_at_least is not None and acc >= sft.stop_accuracy_at_least:
        stop = "accuracy_reached"
    sb = sft.stop_accuracy_band
    if sb and sb[0] <= acc <= sb[1]:
        stop = "accuracy_in_band"
    return snap, stop


def check_accuracy_config(sft: Any) -> list[str]:
    """Problems with the ``sft.accuracy_*`` / stop / snapshot keys (messages name the key)."""
    problems = []
    wants = sft.stop_accuracy_at_least is not None or sft.stop_accuracy_band or sft.snapshot_accuracy_band
    if (sft.accuracy_every or wants) and not sft.accuracy_files:
        problems.append("sft.accuracy_every / sft.stop_accuracy_* / sft.snapshot_accuracy_band need "
                        "sft.accuracy_files (held-out RL-layout prompt rows)")
    if wants and not sft.accuracy_every:
        problems.append("sft.stop_accuracy_* / sft.snapshot_accuracy_band need sft.accuracy_every > 0")
    for f in sft.accuracy_files:
        if not Path(f).is_file():
            problems.append(f"data file '{f}' (sft.accuracy_files) does not exist: generate it or fix the path")
    for key in ("stop_accuracy_band", "snapshot_accuracy_band"):
        band = getattr(sft, key)
        if band and (len(band) != 2 or not 0 <= band[0] <= band[1] <= 1):
            problems.append(f"sft.{key}={band!r} must be [low, high] with 0 <= low <= high <= 1")
    if sft.snapshot_accuracy_band and not sft.snapshot_out:
        problems.append("sft.snapshot_accuracy_band needs sft.snapshot_out (where the in-band checkpoint goes)")
    if sft.accuracy_every < 0 or sft.accuracy_prompts < 0 or sft.accuracy_max_response_length < 1:
        problems.append("sft.accuracy_every and sft.accuracy_prompts must be >= 0, "
                        "sft.accuracy_max_response_length >= 1")
    return problems


class AccuracyHook(SFTHook):
    """Tool-using held-out accuracy every ``sft.accuracy_every`` steps; snapshot / stop by it."""

    def __init__(self, cfg: Any, tokenizer: Any):
        self.cfg, self.sft, self.tok = cfg, cfg.sft, tokenizer
        self.last_loss: Optional[float] = None
        self.snapshot_taken = False
        self.best: Optional[float] = None
        self.records: list[dict] = []
        self._ready = False

    # -- set-up and tear-down ----------------------------------------------------------------------

    def on_start(self, trainer: Any) -> None:
        cfg, s = self.cfg, self.sft
        # One greedy-or-sampled answer per prompt at the accuracy budget; everything else as in cfg.eval.
        eval_cfg = dataclasses.replace(cfg.eval, n=1, ks=[1], temperature=s.accuracy_temperature, top_p=1.0,
                                       max_response_length=s.accuracy_max_response_length, chunk_prompts=0)
        self.eval_rt = runtime.build_eval_runtime(cfg, self.tok, files=s.accuracy_files, limit=s.accuracy_prompts,
                                                  files_key="sft.accuracy_files", model=trainer.model(),
                                                  eval_cfg=eval_cfg, seed=s.seed)
        self._ready = True
        self._resume(trainer)

    def _resume(self, trainer: Any) -> None:
        """Keep the measurements up to the (restored) step; a fresh run starts an empty file. The
        snapshot counts as taken when an earlier measurement was inside the band."""
        path = trainer.out_dir / "accuracy.jsonl"
        old = []
        if trainer.step > 0 and path.is_file():
            old = read_jsonl(path)
            old = [r for r in old if r["step"] <= trainer.step]
        self.records = old
        for r in old:
            snap, _ = accuracy_decision(r["acc"], self.sft, self.snapshot_taken)
            self.snapshot_taken |= snap
            self.best = r["acc"] if self.best is None else max(self.best, r["acc"])
        if trainer.is_writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, old)

    def on_end(self, trainer: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._ready:
            self._ready = False
            self.eval_rt.close()

    # -- measuring ---------------------------------------------------------------------------------

    def measure(self, trainer: Any, step: int) -> dict:
        """Accuracy of ``trainer``'s current weights: ``acc`` (mean over data sources),
        ``tool_calls``, ``tool_error_rate``, ``turns``, ``seconds``."""

        t0 = time.perf_counter()
        self.eval_rt.engine.update_params(trainer.state.params)
        figures = self.eval_rt.run(step)
        per = [v for v in figures.values() if isinstance(v, dict) and "acc" in v]
        mean = lambda k: float(sum(v.get(k, 0.0) for v in per) / max(len(per), 1))  # noqa: E731
        return {"step": step, "acc": mean("acc"), "tool_calls": mean("tool_calls_mean"),
                "tool_error_rate": mean("tool_error_rate"), "turns": mean("turns_mean"),
                "prompts": len(self.eval_rt.rows), "train_loss": self.last_loss,
                "seconds": time.perf_counter() - t0}

    def on_metrics(self, trainer: Any, step: int, metrics: dict) -> None:
        if "loss" in metrics:
            self.last_loss = float(metrics["loss"])

    def on_step(self, trainer: Any, step: int) -> None:
        s = self.sft
        if not s.accuracy_every or step % s.accuracy_every:
            return
        if self.last_loss is None or self.last_loss >= s.accuracy_after_loss:
            return
        rec = self.measure(trainer, step)
        self.records.append(rec)
        if trainer.is_writer:
            append_jsonl(trainer.out_dir / "accuracy.jsonl", [rec])
        snap, stop = accuracy_decision(rec["acc"], s, self.snapshot_taken)
        note = f"step {step}: held-out tool-using accuracy {rec['acc']:.3f} ({rec['prompts']} prompts)"
        if snap:
            trainer.export(s.snapshot_out)
            self.snapshot_taken = True
            note += f"; in-band snapshot -> {s.snapshot_out}"
        if self.best is None or rec["acc"] > self.best:
            self.best = rec["acc"]
            trainer.export(trainer.out_dir / "best")
        if stop:
            trainer.request_stop(stop)
            note += f"; stopping ({stop})"
        trainer.say(note)


__all__ = ["AccuracyHook", "accuracy_decision", "check_accuracy_config"]
