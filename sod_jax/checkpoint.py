"""Checkpoints for training loops: orbax async saves, resume, preemption.

A checkpoint is one orbax step directory ``<dir>/<step>/`` with two items:

- ``state``: any pytree of arrays, typically :class:`sod_jax.rl.update.TrainState` (step, params,
  opt_state, rng as PRNG key *data*). Nothing here depends on its fields: the tree saved is the
  tree restored, into the structure and shardings of the abstract tree given to
  :meth:`Checkpointer.restore`.
- ``extra``: a JSON object the loop needs to continue exactly: data-loader state
  (``PromptLoader.get_state()``), sampler seeds, the resolved config (``Config.to_dict()``; its
  ``model.path`` names the base model, which ``python -m sod_jax.convert orbax-to-hf`` reads for the
  tokenizer), and the metric history needed to continue curves.

Saves are asynchronous: :meth:`Checkpointer.save` blocks only while the arrays are copied off the
devices (and while a previous save is still being written), then orbax writes in a background
thread into a temporary directory that is renamed into place when complete. A process killed
mid-save therefore leaves at most a temporary directory, never a half-written step; a step whose
files were damaged afterwards (truncated, missing) fails to restore and :meth:`restore` falls back to
the previous step with a warning naming both.

The directory may be local or a ``gs://`` URL (shared storage for a pod; see
:mod:`sod_jax.paths`): orbax writes the arrays through TensorStore, which reads and writes local
paths and ``gs://`` only, so other URL schemes are refused when the :class:`Checkpointer` is made.

Typical loop (RL or SFT)::

    ckpt = Checkpointer.from_config(cfg.checkpoint, cfg.train.out_dir)
    start, state, extra = 0, init_state, {}
    if cfg.checkpoint.resume and (got := ckpt.restore(abstract_like(init_state))) is not None:
        start, state, extra = got
        loader.set_state(extra["loader"])
    with PreemptionGuard() as guard:
        for step in range(start + 1, total + 1):
            state, metrics = update(state, ...)
            saved = ckpt.save(step, state, extra=make_extra(), force=guard.requested or step == total)
            metrics["checkpoint_blocking_s"] = ckpt.last_save_blocking_s if saved else 0.0
            if guard.stop_now():
                break
    ckpt.close()   # waits for the last write

Preemption time bound: after SIGTERM/SIGINT the loop finishes the step in progress, then one save
(device-to-host copy, then the write of one checkpoint) completes before exit. The bound is
therefore one training step plus one checkpoint write (plus any earlier save still being written);
a second signal ends the process at once (exit status 128 + signal number) and leaves every
previously finalized checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sod_jax import paths
from sod_jax.paths import AnyPath

log = logging.getLogger(__name__)

# URL schemes orbax can write arrays to (its TensorStore kvstore for a URL is the GCS driver).
CHECKPOINT_SCHEMES = ("gs",)

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointWarning(UserWarning):
    """A checkpoint could not be used and another one was taken instead."""


def quiet_orbax_logs() -> None:
    """orbax reports every save/restore stage at INFO (and absent optional files as warnings) through
    absl; keep only errors unless the user set the ``absl`` logger's level."""
    absl_log = logging.getLogger("absl")
    if absl_log.level == logging.NOTSET:
        absl_log.setLevel(logging.ERROR)


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (shape, dtype, sharding) of a tree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _check_leaves(tree: Any, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(f"{what}: leaf {jax.tree_util.keystr(path)} is a typed PRNG key; checkpoint its "
                            f"key data instead (jax.random.key_data(key), and jax.random.wrap_key_data on restore)")


def _with_default_sharding(abstract: Any) -> Any:
    """Restore targets need a sharding; leaves without one go to the first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def fix(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        if isinstance(x, (jax.Array, np.ndarray)):
            return ocp.utils.to_shape_dtype_struct(x) if isinstance(x, jax.Array) else \
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        return x

    return jax.tree.map(fix, abstract)


class Checkpointer:
    """orbax ``CheckpointManager`` for one run: periodic async saves, keep-last-N, resume with fallback.

    Args:
      directory: where step directories live (created if missing): a local path or a ``gs://`` URL.
      save_every: :meth:`save` writes when ``step % save_every == 0`` (or ``force``); <= 0: only forced.
      keep: keep the newest ``keep`` checkpoints (older ones are deleted after a save finishes).
      async_save: write in a background thread (the caller blocks only for the device-to-host copy).

    Every process of a multi-process run must make the same calls (orbax coordinates the write).
    """

    def __init__(self, directory: Union[str, os.PathLike], *, save_every: int, keep: int,
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        if paths.is_url(directory) and paths.scheme(directory) not in CHECKPOINT_SCHEMES:
            schemes = ", ".join(s + "://" for s in CHECKPOINT_SCHEMES)
            raise paths.StorageError(f"checkpoint directory '{os.fspath(directory)}': orbax writes checkpoints to local "
                                     f"(or mounted) paths and {schemes} URLs only; set checkpoint.dir to one of those")
        self.directory: AnyPath = paths.absolute(directory)
        self.save_every = int(save_every)
        self.keep = int(keep)
        self.last_save_blocking_s: float = 0.0  # seconds the last save() that wrote held the caller
        quiet_orbax_logs()
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=async_save,
                                               create=True)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))
        except ImportError as e:  # a URL whose storage client is not installed
            raise paths.storage_error(self.directory, e) from None

    @classmethod
    def from_config(cls, ckpt_cfg: Any, out_dir: Union[str, os.PathLike]) -> "Checkpointer":
        """From a :class:`sod_jax.config.CheckpointConfig`; ``dir`` defaults to ``<out_dir>/checkpoints``
        (a URL ``out_dir`` gives a URL)."""
        directory = ckpt_cfg.dir or paths.as_path(out_dir) / "checkpoints"
        return cls(directory, save_every=ckpt_cfg.save_every, keep=ckpt_cfg.keep, async_save=ckpt_cfg.async_save)

    # -- queries ---------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalized steps on disk, ascending (a save still being written is not listed)."""
        try:
            self._mngr.reload()
            return sorted(self._mngr.all_steps())
        except ImportError as e:  # orbax asks a gs:// bucket's layout through google-cloud-storage
            raise paths.storage_error(self.directory, e) from None

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    # -- save --------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, extra: Optional[dict] = None, force: bool = False) -> bool:
        """Save ``state`` (pytree of arrays) and ``extra`` (JSON object) as ``step`` when it is due.

        Returns True when a save was started. ``last_save_blocking_s`` then holds the seconds this call
        blocked (device-to-host copy, plus waiting for a previous save still in flight). A step that
        already exists on disk is not written again.
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        _check_leaves(state, "Checkpointer.save(state)")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise TypeError(f"Checkpointer.save(extra=...) must be a dict (JSON object), got {type(extra).__name__}")
        t0 = time.perf_counter()
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(extra)})
        saved = self._mngr.save(step, args=args, force=True)
        self.last_save_blocking_s = time.perf_counter() - t0
        return bool(saved)

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for the save in flight and release orbax's resources (a second call does nothing)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._mngr.wait_until_finished()
        self._mngr.close()

    # -- restore -----------------------------------------------------------------------------------

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                     EXTRA_ITEM: ocp.args.JsonRestore()})
        out = self._mngr.restore(step, args=args)
        state, extra = out[STATE_ITEM], out[EXTRA_ITEM]
        if extra is None:
            raise ValueError("the 'extra' item is missing")
        # Reading completes lazily in places; touching every leaf surfaces a damaged file here.
        jax.block_until_ready(state)
        return state, extra

    def _quarantine(self, step: int) -> Optional[AnyPath]:
        """Move an unreadable step aside (kept for inspection; its step number becomes free again)."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}{UNREADABLE_SUFFIX}"
        if jax.process_index() == 0 and src.exists():
            n = 1
            while dst.exists():
                dst, n = self.directory / f"{step}{UNREADABLE_SUFFIX}{n}", n + 1
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"sod_jax_checkpoint_quarantine_{step}")
        self._mngr.reload()
        return dst if dst.exists() else None

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Optional[tuple[int, Any, dict]]:
        """Restore ``(step, state, extra)``, or None when the directory holds no checkpoint.

        ``abstract_state`` is the target: a pytree like the saved state whose leaves are
        ``jax.ShapeDtypeStruct`` with shardings (see :func:`abstract_like`) or concrete arrays; each
        array is read straight into that sharding, so a checkpoint saved on 8 devices restores onto a
        mesh of 4 or a single device. With ``step=None`` the newest readable checkpoint is used: an
        unreadable one (killed mid-save, truncated or missing file) is moved aside to
        ``<step>.unreadable`` and the previous one is tried, with a :class:`CheckpointWarning` naming
        both. An explicit ``step`` that cannot be read raises.
        """
        _check_leaves(abstract_state, "Checkpointer.restore(abstract_state)")
        abstract_state = _with_default_sharding(abstract_state)
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise FileNotFoundError(f"checkpoint step {step} not found in {self.directory} "
                                        f"(available: {steps or 'none'})")
            state, extra = self._restore_step(int(step), abstract_state)
            return int(step), state, extra
        failed: list[tuple[int, str]] = []
        for s in reversed(steps):
            try:
                state, extra = self._restore_step(s, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means "this step is unusable"
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                failed.append((s, reason))
                moved = self._quarantine(s)
                log.warning("checkpoint step %d in %s is unreadable (%s)%s", s, self.directory, reason,
                            f"; moved to {moved}" if moved else "")
                continue
            if failed:
                names = ", ".join(f"step {f} ({r})" for f, r in failed)
                warnings.warn(f"checkpoint {self.directory}: the latest checkpoint(s) could not be read: {names}; "
                              f"restored step {s} instead (unreadable ones moved to <step>{UNREADABLE_SUFFIX})",
                              CheckpointWarning, stacklevel=2)
            log.info("restored checkpoint step %d from %s", s, self.directory)
            return s, state, extra
        if failed:
            names = ", ".join(f"step {f} ({r})" for f, r in failed)
            raise RuntimeError(f"no readable checkpoint in {self.directory}: {names}")
        return None

    def restore_extra(self, step: Optional[int] = None) -> Optional[tuple[int, dict]]:
        """Only the JSON ``extra`` of ``step`` (default: newest): cheap, no arrays read."""
        steps = self.all_steps()
        if not steps:
            return None
        step = steps[-1] if step is None else int(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(**{EXTRA_ITEM: ocp.args.JsonRestore()}))
        return step, out[EXTRA_ITEM]


# -------------------------------------------------------------------------------------------------
# Continuing a run
# -------------------------------------------------------------------------------------------------


def config_differences(saved: dict, current: dict, prefix: str = "",
                       ignore: Sequence[str] = ("checkpoint.resume",)) -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two ``Config.to_dict()`` trees."""
    out = []
    for k in sorted(set(saved) | set(current)):
        name = f"{prefix}{k}"
        a, b = saved.get(k, "<unset>"), current.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".", ignore)
        elif a != b and name not in ignore:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


# -------------------------------------------------------------------------------------------------
# Preemption
# -------------------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turn SIGTERM / SIGINT into a request to stop at the next step boundary.

    Inside ``with PreemptionGuard() as guard:`` the first signal sets ``guard.requested`` (and
    ``guard.signal``) and prints one line; the loop then saves (``force=True``), waits for the save
    and returns normally, so the process exits 0. A second signal exits at once with status
    128 + signal number: a save in flight is abandoned in its temporary directory and every
    finalized checkpoint stays valid (orbax renames a step into place only when it is complete).

    Time bound from the first signal to exit: the rest of the current step, plus one checkpoint
    save (device-to-host copy and the write), plus any earlier save still being written.

    Handlers are installed only in the main thread (Python delivers signals there); elsewhere the
    guard is inert. The previous handlers are restored on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            sys.stderr.write(f"\n{name} again: exiting now (finalized checkpoints are intact)\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested, self.signal = True, signum
        sys.stderr.write(f"\n{name} received: saving a checkpoint at the end of this step, then exiting "
                         f"(send it again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "PreemptionGuard":
        if self._previous:  # already entered (a run enters it at start-up, its loop again)
            return self
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def stop_now(self) -> bool:
        """True when any process received a stop signal (agreed across processes: call it on all of
        them at the same step; single-process runs just read ``requested``)."""
        if jax.process_count() == 1:
            return self.requested

        flags = multihost_utils.process_allgather(np.array([self.requested], dtype=np.int32))
        return bool(np.asarray(flags).any())
