"""Cold-start SFT: the training loop and its hook points.

:class:`SFTTrainer` runs the planned steps of :mod:`sod_jax.sft.step` and calls :class:`SFTHook`
methods at fixed points (start, after every step, after every held-out evaluation, after every
export, at the end). Checkpointing, preemption and early stopping by a downstream metric plug in
there without touching the loop.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sod_jax import optim, parallel
from sod_jax.models import save_pretrained
from sod_jax.sft.packing import Example, SFTBatch, build_batch
from sod_jax.sft.step import (
    SFTState,
    build_eval_step,
    build_train_step,
    eval_batches,
    plan_steps,
)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")


# ---------------------------------------------------------------------------------------------
# Hooks and the loop
# ---------------------------------------------------------------------------------------------


class SFTHook:
    """Override what you need. All methods run on every process, at step boundaries."""

    def on_start(self, trainer: "SFTTrainer") -> None:
        """Before the first step; e.g. restore a checkpoint with ``trainer.set_state(...)``."""

    def on_step(self, trainer: "SFTTrainer", step: int) -> None:
        """After optimizer step ``step`` (1-based) was dispatched; ``trainer.state`` is its result
        (device arrays, possibly still computing). E.g. save a checkpoint, check a preemption flag."""

    def on_metrics(self, trainer: "SFTTrainer", step: int, metrics: dict) -> None:
        """Host metrics of ``step`` (fetched one step late so the device never waits for the host)."""

    def on_eval(self, trainer: "SFTTrainer", step: int, metrics: dict) -> bool:
        """After a held-out evaluation at ``step`` (``val_loss``, ``val_tokens``); return True to stop."""
        return False

    def on_export(self, trainer: "SFTTrainer", step: int, path: Path) -> None:
        """After an HF checkpoint of the weights at ``step`` was written to ``path``."""

    def on_end(self, trainer: "SFTTrainer") -> None:
        """After the last step and the final export."""


@dataclass
class SFTResult:
    steps: int
    stop_reason: str  # finished | max_steps | early_stop | hook | <reason given to request_stop>
    final_loss: Optional[float]
    best_val_loss: Optional[float]
    model_dir: Optional[Path]
    history: list[dict] = field(default_factory=list)


class SFTTrainer:
    """The SFT loop over a planned sequence of packed steps.

    ``model`` is a :class:`sod_jax.models.Qwen3` (already sharded when ``mesh`` is given); ``cfg``
    the whole :class:`sod_jax.config.Config` (``cfg.sft`` and ``cfg.model.logprob_chunk`` are
    read). Files go to ``cfg.sft.out_dir``; ``tokenizer_dir``'s tokenizer files are copied into every
    exported checkpoint."""

    def __init__(self, cfg: Any, model: Any, train_examples: Sequence[Example], val_examples: Sequence[Example] = (),
                 *, tokenizer_dir: Optional[str] = None, mesh: Optional[Mesh] = None,
                 hooks: Sequence[SFTHook] = (), progress: bool = True):
        s = cfg.sft
        self.cfg, self.sft, self.mesh, self.hooks, self.progress = cfg, s, mesh, list(hooks), progress
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.out_dir = Path(s.out_dir)
        self.is_writer = jax.process_index() == 0
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.pack_length = s.pack_length or s.max_length
        batch_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.rows_per_micro = s.micro_batch_rows or batch_devices
        if self.rows_per_micro % batch_devices:
            log.warning("sft.micro_batch_rows=%d is not a multiple of the %d batch-parallel devices; rows are "
                        "not split over them", self.rows_per_micro, batch_devices)
        self.plan = plan_steps([len(e) for e in self.train_examples], batch_size=s.batch_size, epochs=s.epochs,
                               pack_length=self.pack_length, rows_per_micro=self.rows_per_micro, seed=s.seed,
                               shuffle=s.shuffle, max_steps=s.max_steps)
        self.val_batches = eval_batches(self.val_examples, self.pack_length, self.rows_per_micro) if self.val_examples else []
        self.tx, self.schedule = optim.make_optimizer(optim.OptimizerSpec.from_sft(s, self.plan.total_steps))
        self.graphdef, params = nnx.split(model)
        self.model_config = model.config
        self.state_shardings = None
        step0 = jnp.zeros((), jnp.int32)
        if mesh is not None:  # params by their logical axes, moments like their param, the step replicated
            p_sh = parallel.param_shardings(params, mesh)
            counter = NamedSharding(mesh, P())
            self.state_shardings = SFTState(counter, p_sh, optim.opt_state_shardings(self.tx, params, p_sh, mesh))
            step0 = jax.device_put(step0, counter)
        opt_state = optim.init_opt_state(self.tx, params, None if mesh is None else self.state_shardings.opt_state)
        self.state = SFTState(step0, params, opt_state)
        chunk = cfg.model.logprob_chunk
        self.train_step = build_train_step(self.graphdef, self.tx, self.schedule, chunk, mesh, self.state_shardings)
        self.eval_step = build_eval_step(self.graphdef, chunk, mesh)
        self.step = 0
        self.history: list[dict] = []
        self.step_metrics: dict[int, dict] = {}  # host metrics hooks add to a step's record (e.g. checkpoint time)
        self._stop: Optional[tuple[str, bool]] = None
        self.best_val_loss: Optional[float] = None
        self._since_best = 0

    # -- for hooks ---------------------------------------------------------------------------------

    def set_state(self, state: SFTState) -> None:
        """Replace the train state (e.g. restored from a checkpoint); the loop continues from ``state.step``."""
        self.state = state
        self.step = int(jax.device_get(state.step))

    def request_stop(self, reason: str = "hook", export: bool = True) -> None:
        """End the run at the next step boundary (``export=False``: skip the final HF export, e.g. on preemption)."""
        if self._stop is None:
            self._stop = (reason, export)

    def model(self) -> Any:
        """The current weights as a model (shares the state's arrays)."""
        return nnx.merge(self.graphdef, self.state.params)

    # -- pieces ------------------------------------------------------------------------------------

    def batch(self, k: int) -> SFTBatch:
        """Host arrays of planned step ``k`` (0-based)."""
        p = self.plan
        return build_batch(self.train_examples, p.steps[k], p.micro_batches, p.rows_per_micro, p.pack_length)

    def evaluate(self) -> dict:
        """Held-out token-mean NLL over all validation conversations."""
        nll = jnp.zeros((), jnp.float32)
        n = jnp.zeros((), jnp.float32)
        for b in self.val_batches:
            s, c = self.eval_step(self.state.params, parallel.place_rows(b, self.mesh, row_axis=1))
            nll, n = nll + s, n + c
        nll, n = (float(x) for x in jax.device_get((nll, n)))
        return {"val_loss": nll / max(n, 1.0), "val_tokens": int(n)}

    def export(self, path: Path) -> Path:
        """Write the current weights as an HF checkpoint (``save_pretrained``) plus the tokenizer files."""

        save_pretrained(self.model(), path)
        if self.is_writer and self.tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = self.tokenizer_dir / name
                if src.is_file():
                    shutil.copy2(src, Path(path) / name)
        return Path(path)

    def _write(self, name: str, record: dict) -> None:
        if self.is_writer:
            with open(self.out_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> SFTResult:
        s, plan = self.sft, self.plan
        if self.is_writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        for h in self.hooks:
            h.on_start(self)
        total = plan.total_steps
        bar = None
        if self.progress and self.is_writer:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, unit="step", desc="sft", dynamic_ncols=True)
        pending: Optional[tuple[int, dict, int]] = None  # (step, device metrics, real tokens)
        last_t = time.perf_counter()
        last_loss = None
        evaluated_at = -1

        def flush(write: bool = True) -> None:
            nonlocal pending, last_t, last_loss
            if pending is None:
                return
            step, dev, n_real = pending
            pending = None
            m = {k: v.item() for k, v in jax.device_get(dev).items()}
            now = time.perf_counter()
            m["tokens_per_s"] = n_real / max(now - last_t, 1e-9)
            m["tokens"] = n_real
            last_t = now
            m["epoch"] = (step - 1) // plan.steps_per_epoch + 1
            m.update(self.step_metrics.pop(step, {}))
            record = {"step": step, **m}
            self.history.append(record)
            if write:
                self._write("metrics.jsonl", record)
            last_loss = m["loss"]
            for h in self.hooks:
                h.on_metrics(self, step, m)
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")

        def run_eval(step: int) -> None:
            nonlocal evaluated_at
            had_pending = pending is not None
            flush(write=False)
            em = self.evaluate()
            evaluated_at = step
            if had_pending and self.history[-1]["step"] == step:  # one record per step: train and held-out
                self.history[-1].update(em)
                self._write("metrics.jsonl", self.history[-1])
            else:
                self.history.append({"step": step, **em})
                self._write("metrics.jsonl", self.history[-1])
            if self.best_val_loss is None or em["val_loss"] < self.best_val_loss:
                self.best_val_loss, self._since_best = em["val_loss"], 0
            else:
                self._since_best += 1
                if s.early_stop_patience and self._since_best >= s.early_stop_patience:
                    self.request_stop("early_stop")
            for h in self.hooks:
                if h.on_eval(self, step, em):
                    self.request_stop("hook")
            if bar is not None:
                bar.write(f"step {step}: held-out loss {em['val_loss']:.4f} over {em['val_tokens']} tokens")

        if self.val_batches and self.step == 0 and s.eval_every:
            run_eval(0)
        while self.step < total and self._stop is None:
            k = self.step
            host = self.batch(k)
            n_real = int((host.segment_ids > 0).sum())
            self.state, dev_metrics = self.train_step(self.state, parallel.place_rows(host, self.mesh, row_axis=1))
            self.step = k + 1
            flush()  # the previous step's metrics; the device is busy with this one
            pending = (self.step, dev_metrics, n_real)
            for h in self.hooks:
                h.on_step(self, self.step)
            if bar is not None:
                bar.update(1)
            if self.val_batches and s.eval_every and self.step % s.eval_every == 0:
                run_eval(self.step)
            if s.save_every and self.step % s.save_every == 0 and self.step < total:
                flush()
                path = self.export(self.out_dir / "hf" / f"step_{self.step:06d}")
                for h in self.hooks:
                    h.on_export(self, self.step, path)
        flush()
        if bar is not None:
            bar.close()
        reason, do_export = self._stop or ("max_steps" if s.max_steps and total == s.max_steps else "finished", True)
        if self.val_batches and evaluated_at != self.step and do_export:
            run_eval(self.step)
        model_dir = None
        if do_export:
            model_dir = self.export(self.out_dir / "model")
            for h in self.hooks:
                h.on_export(self, self.step, model_dir)
        if self.is_writer and self.cfg.logging.plots:
            plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "plots" / "sft_loss.png")
        for h in self.hooks:
            h.on_end(self)
        return SFTResult(self.step, reason, last_loss, self.best_val_loss, model_dir, self.history)


def plot_curves(metrics_file: Path, out_png: Path) -> None:
    """Training and held-out loss against step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return
    recs = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train and not val:
        return
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token-mean NLL (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


__all__ = ["SFTHook", "SFTResult", "SFTTrainer", "TOKENIZER_FILES", "plot_curves"]
