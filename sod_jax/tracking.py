"""The run directory (DESIGN §5): what RL, SFT and eval runs write, and the plots drawn from it.

``RunDir(out_dir)`` owns the files of one run:

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one JSON object per step (``step`` plus named metrics; vectors as lists);
- ``eval.jsonl``: one object per evaluation (``step`` and per data_source ``acc``, pass@k, maj@k);
- ``step_weights.jsonl``: per step a bounded sample of trajectories' ``(d_k, w_k)`` lists;
- ``plots/*.png``: learning curves, regenerated from the jsonl files alone
  (``python -m sod_jax.tracking plot RUN_DIR``, so a pod's run can be plotted on a laptop);
- TensorBoard events (``logging.tensorboard``) and Weights & Biases (``logging.wandb``, optional).

Only process 0 writes (``RunDir(..., enabled=jax.process_index() == 0)``); other processes get a
writer whose methods do nothing. On resume, :meth:`RunDir.truncate_after` drops records of steps
after the restored checkpoint so curves continue without duplicates.

The run directory may be a URL (``gs://bucket/run``, see :mod:`sod_jax.paths`): every file goes
through the same path object, jsonl appends become rewrites of the object, plots are rendered to
bytes and written whole. TensorBoard events and the wandb directory are written only to a local run
directory (for a URL the run has no TensorBoard events; ``metrics.jsonl`` holds every scalar).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from typing import Any, Iterable, Optional

import numpy as np

from sod_jax import paths
from sod_jax.paths import AnyPath, as_path

log = logging.getLogger(__name__)


def _plain(x: Any) -> Any:
    """JSON-able form of a metric value: numpy/jax scalars -> float/int, arrays -> lists, NaN -> None."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = np.asarray(x).tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


# -- jsonl: every run file of the project is read and written through these ------------------------


def read_jsonl(path: paths.PathLike) -> list[dict]:
    """Records of a jsonl file (none when it is missing); a torn line (a run killed mid-write) is
    skipped, so the record it held is simply redone."""
    path = as_path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: paths.PathLike, records: Iterable[dict], *, sync: bool = False) -> None:
    """Append one line per record (values made JSON-able: numpy scalars, NaN -> null); ``sync``
    forces them to disk before returning (outputs a resumed run relies on). On a URL the file is
    rewritten with the lines added (:func:`sod_jax.paths.append_text`)."""
    paths.append_text(path, "".join(json.dumps(_plain(rec), ensure_ascii=False) + "\n" for rec in records),
                      sync=sync)


def write_jsonl(path: paths.PathLike, records: Iterable[dict]) -> None:
    """Replace the file with these records, atomically (a kill leaves the old file or the new one)."""
    paths.replace_text(path, "".join(json.dumps(_plain(r), ensure_ascii=False) + "\n" for r in records))


class RunDir:
    """Writers of one run directory. See the module docstring."""

    def __init__(self, out_dir: paths.PathLike, *, enabled: bool = True, tensorboard: bool = False,
                 wandb: bool = False, project: str = "sod_jax", run_name: Optional[str] = None,
                 config: Optional[dict] = None):
        self.path = as_path(out_dir)
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        paths.makedirs(self.path / "plots")
        local = paths.local_path(self.path)
        if tensorboard and local is None:
            log.warning("logging.tensorboard: no TensorBoard events for the run directory %s (events are written "
                        "only to a local directory); metrics.jsonl holds every scalar", self.path)
        elif tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(local / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise SystemExit("error: logging.wandb=true needs the wandb package: pip install wandb "
                                 "(or set logging.wandb=false)") from None
            self._wandb = wb.init(project=project, name=run_name or self.path.name, config=config,
                                  dir=None if local is None else str(local), resume="allow")

    # -- files -------------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self.path / name).write_text(text)

    def _append(self, name: str, record: dict) -> None:
        append_jsonl(self.path / name, [record])

    def log_metrics(self, step: int, metrics: dict) -> None:
        """One line of ``metrics.jsonl``; scalars also to TensorBoard / wandb."""
        if not self.enabled:
            return
        self._append("metrics.jsonl", {"step": step, **metrics})
        self._trackers(step, {k: float(v) for k, v in metrics.items()
                              if np.ndim(v) == 0 and isinstance(_plain(v), (int, float))})

    def _trackers(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars to TensorBoard and wandb when enabled."""
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_eval(self, step: int, summary: dict) -> None:
        """One line of ``eval.jsonl``: ``step`` and per data_source its figures."""
        if not self.enabled:
            return
        self._append("eval.jsonl", {"step": step, **summary})
        self._trackers(step, {f"eval/{src}/{k}": float(v) for src, d in summary.items() if isinstance(d, dict)
                              for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def log_step_weights(self, step: int, samples: list[dict]) -> None:
        """One line of ``step_weights.jsonl``: ``samples`` is a short list of ``{"d": [...], "w": [...], ...}``."""
        if self.enabled and samples:
            self._append("step_weights.jsonl", {"step": step, "trajectories": samples})

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` (a resumed run re-does them) and a torn last line (a run
        killed mid-write); each file is replaced atomically."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "eval.jsonl", "step_weights.jsonl"):
            p = self.path / name
            if p.is_file():
                write_jsonl(p, [r for r in read_jsonl(p) if r.get("step", 0) <= step])

    def plot(self) -> list[AnyPath]:
        return plot_run(self.path) if self.enabled else []

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# ---------------------------------------------------------------------------------------------
# Plots (from the jsonl files alone)
# ---------------------------------------------------------------------------------------------


def _series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _write_png(fig, path: AnyPath) -> AnyPath:
    """Render the figure to PNG bytes and write them in one go (works for local paths and URLs alike)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def _save(fig, path: AnyPath, ax) -> AnyPath:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _write_png(fig, path)


def _curves(out: AnyPath, records: list[dict], keys: Iterable[tuple[str, str]], title: str, ylabel: str,
            xlabel: str = "RL step") -> Optional[AnyPath]:
    lines = [(label, *_series(records, key)) for key, label in keys]
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    fig, ax = _figure(title, xlabel, ylabel)
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
    return _save(fig, out, ax)


def plot_run(run_dir: paths.PathLike) -> list[AnyPath]:
    """Write ``plots/*.png`` from ``metrics.jsonl`` and ``eval.jsonl``; returns the files written."""
    run = as_path(run_dir)
    metrics = read_jsonl(run / "metrics.jsonl")
    evals = read_jsonl(run / "eval.jsonl")
    out = paths.makedirs(run / "plots")
    written = [
        _curves(out / "reward.png", metrics, [("reward_mean", "reward (incl. overlong penalty)"),
                                             ("acc", "accuracy (training rollouts)")],
                "Training reward and accuracy", "value"),
        _curves(out / "kl.png", metrics, [("kl_k1", "k1 = E[s - q]"), ("kl_k3", "k3")],
                "Student-teacher KL on training rollouts", "KL (nats / token)"),
        _curves(out / "length.png", metrics, [("response_length_mean", "response tokens (mean)")],
                "Response length", "tokens"),
        _curves(out / "sft_loss.png", metrics, [("loss", "train loss"), ("val_loss", "held-out loss")],
                "SFT loss", "token-mean NLL (assistant tokens)", xlabel="optimizer step"),
        _curves(out / "turns.png", metrics, [("turns_mean", "assistant turns"), ("tool_calls_mean", "tool calls"),
                                            ("tool_error_rate", "tool error rate")],
                "Turns and tool use per trajectory", "per trajectory"),
    ]
    # Held-out accuracy per data_source.
    sources = sorted({k for e in evals for k, v in e.items() if isinstance(v, dict) and "acc" in v})
    if sources:
        fig, ax = _figure("Held-out accuracy (avg@k)", "RL step", "accuracy")
        for src in sources:
            xs = [e["step"] for e in evals if isinstance(e.get(src), dict)]
            ys = [e[src]["acc"] for e in evals if isinstance(e.get(src), dict)]
            ax.plot(xs, ys, marker="o", ms=4, label=src)
        written.append(_save(fig, out / "eval_acc.png", ax))
    # Step weights and divergences by step index k (SOD diagnostics), early vs late in the run.
    rows = [m for m in metrics if isinstance(m.get("step_w_mean_by_k"), list)]
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
        picks = sorted({0, len(rows) // 2, len(rows) - 1})
        for i in picks:
            r = rows[i]
            counts = r.get("step_count_by_k") or [1] * len(r["step_w_mean_by_k"])
            ks = [k + 1 for k, c in enumerate(counts) if c]  # element i holds assistant turn k = i + 1
            if not ks:
                continue
            a1.plot(ks, [r["step_w_mean_by_k"][k - 1] for k in ks], marker="o", ms=4, label=f"step {r['step']}")
            a2.plot(ks, [r["step_d_mean_by_k"][k - 1] for k in ks], marker="o", ms=4, label=f"step {r['step']}")
        a1.set_title("Mean step weight w_k")
        a2.set_title("Mean step divergence d_k = mean |s - q|")
        from matplotlib.ticker import MaxNLocator

        for a, yl in ((a1, "w_k"), (a2, "d_k")):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.set_xlabel("assistant turn k")
            a.set_ylabel(yl)
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=8)
        fig.tight_layout()
        written.append(_write_png(fig, out / "step_weights.png"))
    return [p for p in written if p is not None]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sod_jax.tracking",
        description="Run-directory tools. `plot RUN_DIR` redraws plots/*.png from metrics.jsonl and eval.jsonl.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="regenerate the PNG plots of a run directory")
    p.add_argument("run_dir")
    args = parser.parse_args(argv)
    run = as_path(args.run_dir)
    if not (run / "metrics.jsonl").is_file() and not (run / "eval.jsonl").is_file():
        raise SystemExit(f"error: {run} holds no metrics.jsonl or eval.jsonl; pass a run directory (train.out_dir)")
    for path in plot_run(run):
        print(path)


if __name__ == "__main__":
    main()
