"""Cold-start SFT: the training loop.

:class:`SFTTrainer` runs the planned steps of :mod:`sod_jax.sft.step` on the shared loop skeleton
(:class:`sod_jax.loop.Loop`), whose hooks (:class:`SFTHook` is :class:`sod_jax.loop.Hook`) are
called at fixed points: start, after every step, with every step's host metrics, after every
held-out evaluation, after every export, at the end. Checkpoints with auto-resume, preemption and
early stopping by a downstream metric (:mod:`sod_jax.sft.accuracy_hook`) plug in there.

Checkpoints (:class:`sod_jax.loop.CheckpointHook`) hold the :class:`SFTState`; the step counter is
the data position (the plan is a pure function of the seed and the step), so a restored run
continues with the next planned batch. ``metrics.jsonl`` loses records past the restored step (they
are recomputed identically); the metric history and the early-stopping state come from the
checkpoint's ``extra``. A save at a step with a held-out evaluation follows the evaluation, so a
resumed run's early stopping continues exactly; the seconds a save blocked the loop are added to
that step's record (or the next one's when the step's record is already written) as
``checkpoint_blocking_s``.

``sft.out_dir`` may be a URL (``gs://bucket/run``, :mod:`sod_jax.paths`): the run files go there
directly, and an HF export is written to a local staging directory first (safetensors files are
written locally) and then copied file by file.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sod_jax import optim, parallel, paths
from sod_jax.checkpoint import config_differences
from sod_jax.loop import Hook, Loop
from sod_jax.models import save_pretrained
from sod_jax.models.hf import config_to_hf
from sod_jax.paths import AnyPath
from sod_jax.sft.packing import Example, SFTBatch, build_batch
from sod_jax.sft.step import SFTState, build_eval_step, build_train_step, eval_batches, plan_steps
from sod_jax.tracking import RunDir

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")


# ---------------------------------------------------------------------------------------------
# Hooks and the loop
# ---------------------------------------------------------------------------------------------


# The SFT loop's hooks are the shared loop's (the name stays for SFT-specific hooks and callers).
SFTHook = Hook


@dataclass
class SFTResult:
    steps: int
    stop_reason: str  # finished | max_steps | early_stop | hook | <reason given to request_stop>
    final_loss: Optional[float]
    best_val_loss: Optional[float]
    model_dir: Optional[AnyPath]
    history: list[dict] = field(default_factory=list)


class SFTTrainer(Loop):
    """The SFT loop over a planned sequence of packed steps.

    ``model`` is a :class:`sod_jax.models.Qwen3` (already sharded when ``mesh`` is given); ``cfg``
    the whole :class:`sod_jax.config.Config` (``cfg.sft`` and ``cfg.model.logprob_chunk`` are
    read). Files go to ``cfg.sft.out_dir``; ``tokenizer_dir``'s tokenizer files are copied into every
    exported checkpoint."""

    def __init__(self, cfg: Any, model: Any, train_examples: Sequence[Example], val_examples: Sequence[Example] = (),
                 *, tokenizer_dir: Optional[str] = None, mesh: Optional[Mesh] = None,
                 hooks: Sequence[SFTHook] = (), progress: bool = True):
        super().__init__(hooks=hooks, progress=progress, is_main=jax.process_index() == 0)
        s = cfg.sft
        self.desc = "sft"
        self.cfg, self.sft, self.mesh = cfg, s, mesh
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.out_dir = paths.as_path(s.out_dir)
        self.is_writer = self.is_main
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
        self.step_fn = build_train_step(self.graphdef, self.tx, self.schedule, chunk, mesh, self.state_shardings)
        self.eval_step = build_eval_step(self.graphdef, chunk, mesh)
        self.total_steps = self.plan.total_steps
        self.history: list[dict] = []
        self.best_val_loss: Optional[float] = None
        self._since_best = 0
        self.run_dir = RunDir(self.out_dir, enabled=self.is_writer, tensorboard=cfg.logging.tensorboard,
                              wandb=cfg.logging.wandb, project=cfg.logging.project, config=cfg.to_dict())
        self._pending: Optional[tuple[int, dict, int]] = None  # (step, device metrics, real tokens)
        self._last_t = time.perf_counter()
        self.last_loss: Optional[float] = None
        self._evaluated_at = -1

    # -- for hooks ---------------------------------------------------------------------------------

    def set_state(self, state: SFTState) -> None:
        """Replace the train state (e.g. restored from a checkpoint); the loop continues from ``state.step``."""
        self.state = state
        self.step = int(jax.device_get(state.step))

    def model(self) -> Any:
        """The current weights as a model (shares the state's arrays)."""
        return nnx.merge(self.graphdef, self.state.params)

    # -- pieces ------------------------------------------------------------------------------------

    def batch(self, k: int) -> SFTBatch:
        """Host arrays of planned step ``k`` (0-based)."""
        p = self.plan
        return build_batch(self.train_examples, p.steps[k], p.micro_batches, p.rows_per_micro, p.pack_length)

    def held_out_loss(self) -> dict:
        """Held-out token-mean NLL over all validation conversations."""
        nll = jnp.zeros((), jnp.float32)
        n = jnp.zeros((), jnp.float32)
        for b in self.val_batches:
            s, c = self.eval_step(self.state.params, parallel.place_rows(b, self.mesh, row_axis=1))
            nll, n = nll + s, n + c
        nll, n = (float(x) for x in jax.device_get((nll, n)))
        return {"val_loss": nll / max(n, 1.0), "val_tokens": int(n)}

    def export(self, path: paths.PathLike) -> AnyPath:
        """Write the current weights as an HF checkpoint (``save_pretrained``) plus the tokenizer files.
        Every process calls it (the weights are gathered); process 0 writes. A URL ``path``: written to
        a local staging directory, then copied there (see the module docstring)."""

        dest = paths.as_path(path)
        local = paths.local_path(dest)
        if local is not None:
            save_pretrained(self.model(), local)
            self._copy_tokenizer(local)
            return local
        with tempfile.TemporaryDirectory(prefix="sod_jax_export_") as tmp:
            save_pretrained(self.model(), tmp)
            if self.is_writer:
                self._copy_tokenizer(Path(tmp))
                paths.upload_dir(Path(tmp), dest)
        return dest

    def _copy_tokenizer(self, local_dir: Path) -> None:
        if self.is_writer and self.tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = self.tokenizer_dir / name
                if src.is_file():
                    shutil.copy2(src, local_dir / name)

    # -- checkpoint contents (sod_jax.loop.CheckpointHook) -------------------------------------------

    def checkpoint_state(self) -> SFTState:
        return self.state

    def checkpoint_extra(self, step: int) -> dict:
        # The step's own metrics are still on the device (fetched one step late); the history holds
        # the steps before it. Records past the restored step are dropped on resume.
        return {"config": self.cfg.to_dict(), "hf_config": config_to_hf(self.model_config, self.cfg.model.param_dtype),
                "history": list(self.history), "best_val_loss": self.best_val_loss, "since_best": self._since_best,
                "total_steps": self.plan.total_steps}

    def restore(self, step: int, state: Any, extra: dict) -> None:
        self.set_state(SFTState(*state))
        self.history = [r for r in extra.get("history", []) if r.get("step", 0) <= step]
        self.best_val_loss = extra.get("best_val_loss")
        self._since_best = int(extra.get("since_best", 0))  # early-stopping patience counter
        self.run_dir.truncate_after(step)
        diff = config_differences(extra.get("config", {}), self.cfg.to_dict())
        if diff:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(diff))
        log.info("resumed SFT from checkpoint step %d of %d", step, self.plan.total_steps)

    def add_metrics(self, step: int, **values: Any) -> None:
        """Figures for ``step``'s record; when that record is already written (a step with a held-out
        evaluation), they go with the next step's."""
        if self.history and self.history[-1].get("step", -1) >= step:
            step += 1
        super().add_metrics(step, **values)

    # -- the loop's parts (sod_jax.loop.Loop) ---------------------------------------------------------

    def _flush(self, write: bool = True) -> None:
        """Fetch the pending step's device metrics and record them (one step late, so the device
        never waits for the host)."""
        if self._pending is None:
            return
        step, dev, n_real = self._pending
        self._pending = None
        m = {k: v.item() for k, v in jax.device_get(dev).items()}
        now = time.perf_counter()
        m["tokens_per_s"] = n_real / max(now - self._last_t, 1e-9)
        m["tokens"] = n_real
        self._last_t = now
        m["epoch"] = (step - 1) // self.plan.steps_per_epoch + 1
        m.update(self.step_metrics.pop(step, {}))
        record = {"step": step, **m}
        self.history.append(record)
        if write:
            self.run_dir.log_metrics(step, m)
        self.last_loss = m["loss"]
        if m.get("skipped"):
            log.warning("step %d: non-finite loss or gradient; the update was skipped (params unchanged)", step)
        for h in self.hooks:
            h.on_metrics(self, step, m)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")

    def train_step(self, step: int) -> None:
        host = self.batch(step - 1)
        n_real = int((host.segment_ids > 0).sum())
        self.state, dev_metrics = self.step_fn(self.state, parallel.place_rows(host, self.mesh, row_axis=1))
        self._flush()  # the previous step's metrics; the device is busy with this one
        self._pending = (step, dev_metrics, n_real)
        return None

    def eval_due(self, step: int) -> bool:
        return bool(self.val_batches) and bool(self.sft.eval_every) and step % self.sft.eval_every == 0

    def evaluate(self, step: int) -> dict:
        """Held-out loss at ``step``, in the same record as the step's training metrics; early stopping."""
        had_pending = self._pending is not None
        self._flush(write=False)
        em = self.held_out_loss()
        self._evaluated_at = step
        if had_pending and self.history[-1]["step"] == step:  # one record per step: train and held-out
            self.history[-1].update(em)
        else:
            self.history.append({"step": step, **em})
        rec = self.history[-1]
        self.run_dir.log_metrics(step, {k: v for k, v in rec.items() if k != "step"})
        if self.best_val_loss is None or em["val_loss"] < self.best_val_loss:
            self.best_val_loss, self._since_best = em["val_loss"], 0
        else:
            self._since_best += 1
            if self.sft.early_stop_patience and self._since_best >= self.sft.early_stop_patience:
                self.request_stop("early_stop")
        if self.bar is not None:
            self.bar.write(f"step {step}: held-out loss {em['val_loss']:.4f} over {em['val_tokens']} tokens")
        return em

    def end_of_step(self, step: int) -> None:
        """An HF checkpoint every ``sft.save_every`` steps (the last step's is the final export)."""
        s = self.sft
        if s.save_every and step % s.save_every == 0 and step < self.total_steps:
            self._flush()
            path = self.export(self.out_dir / "hf" / f"step_{step:06d}")
            for h in self.hooks:
                h.on_export(self, step, path)

    def finish(self) -> "SFTResult":
        s = self.sft
        self._flush()
        if self.stop_reason is not None:
            reason, do_export = self.stop_reason, self.stop_export
        else:
            reason, do_export = ("max_steps" if s.max_steps and self.total_steps == s.max_steps else "finished"), True
        if self.val_batches and self._evaluated_at != self.step and do_export:
            self.run_eval(self.step)
        model_dir = None
        if do_export:
            model_dir = self.export(self.out_dir / "model")
            for h in self.hooks:
                h.on_export(self, self.step, model_dir)
        if self.cfg.logging.plots:
            self.run_dir.plot()
        return SFTResult(self.step, reason, self.last_loss, self.best_val_loss, model_dir, self.history)


__all__ = ["SFTHook", "SFTResult", "SFTTrainer", "TOKENIZER_FILES"]
