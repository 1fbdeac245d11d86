"""``python -m sod_jax.demo compare``: SOD vs OPD vs GRPO from the demo student, same steps and budget.

Each (algorithm, seed) is one ordinary ``python -m sod_jax.train`` run of the base config with
``algo.name``, ``train.seed`` and ``train.out_dir`` overridden, so the comparison uses exactly the
code path of any run. Everything reported is read back from the run directories (DESIGN §5):

* held-out accuracy before and after (``eval.jsonl``: the first and last record's ``acc`` of each
  data_source; with several sources their mean);
* the final student-teacher KL on held-out prompts (``heldout_kl`` of the last ``eval.jsonl``
  record; GRPO loads no teacher, so it has none);
* the mean step weight ``w_k`` (turns 2 and later; ``w_1`` is 1 by definition) at the tool step
  where a trajectory first went wrong, at correct tool steps, and at the turns after the wrong
  step (``step_weights.jsonl`` samples: ``w`` per turn, the prompt and the tool outputs; a
  demo_chain tool step is wrong when its output is not the step's true value,
  :func:`step_failures`): whether SOD shrinks the distillation signal where the cascade starts.

Writes ``compare.md`` (the markdown table, mean ± std over seeds) and ``compare_acc.png`` (held-out
accuracy against step, mean with a ±1 std band per algorithm) into ``--out``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sod_jax.demo.task import failed_steps, parse_problem
from sod_jax.tracking import read_jsonl


def eval_acc(record: dict) -> Optional[float]:
    """Mean ``acc`` over the data sources of one ``eval.jsonl`` record."""
    accs = [v["acc"] for v in record.values() if isinstance(v, dict) and isinstance(v.get("acc"), (int, float))]
    return float(np.mean(accs)) if accs else None


def step_failures(sample: dict) -> list[bool]:
    """Per assistant turn of one ``step_weights.jsonl`` trajectory sample: did its tool step fail?

    A demo_chain prompt (``prompt`` parses as a chain) fails at turn k when the tool output after it
    is not the step's true value (a miscopied operand, a wrong expression, no call); this is the
    cascade's start, since later steps copy the wrong value. Other prompts: ``failed_steps`` when
    the writer gave them, else every turn counts as failed when the trajectory had a tool error and
    none otherwise."""

    if sample.get("failed_steps") is not None:
        return [bool(x) for x in sample["failed_steps"]]
    problem = parse_problem(sample.get("prompt") or "")
    if problem is not None and sample.get("tool_outputs") is not None:
        return failed_steps(problem, sample["tool_outputs"])
    n = len(sample.get("w") or [])
    return [sample.get("tool_errors", 0) > 0] * n


def run_summary(run_dir: Path) -> dict:
    """The figures of one run directory (None where the run has no such record)."""
    evals = read_jsonl(run_dir / "eval.jsonl")
    curve = [(int(r["step"]), eval_acc(r)) for r in evals if eval_acc(r) is not None]
    kl = [r["heldout_kl"] for r in evals if isinstance(r.get("heldout_kl"), (int, float))]
    at_fail, at_ok, after_fail = [], [], []
    for rec in read_jsonl(run_dir / "step_weights.jsonl"):
        for t in rec.get("trajectories", []):
            w = t.get("w") or []
            failed = step_failures(t)
            outs = t.get("tool_outputs")
            tool_turn = [o is not None for o in outs] if outs is not None else [True] * len(w)
            first = next((k for k, f in enumerate(failed) if f), None)
            for k in range(1, len(w)):  # w_1 is 1 by definition
                if first is not None and k == first:
                    at_fail.append(w[k])
                elif first is not None and k > first:
                    after_fail.append(w[k])
                elif k < len(tool_turn) and tool_turn[k]:
                    at_ok.append(w[k])
    return {
        "acc_before": curve[0][1] if curve else None,
        "acc_after": curve[-1][1] if curve else None,
        "curve": curve,
        "kl_final": kl[-1] if kl else None,
        "w_failed_tool_step": float(np.mean(at_fail)) if at_fail else None,
        "w_correct_tool_step": float(np.mean(at_ok)) if at_ok else None,
        "w_after_failed_tool": float(np.mean(after_fail)) if after_fail else None,
        "failed_tool_steps": len(at_fail),
    }


def _pm(values: Sequence[Optional[float]], fmt: str = "{:.3f}") -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(np.mean(v))} ± {fmt.format(np.std(v, ddof=1))}"


def table(summaries: dict[str, list[dict]]) -> str:
    """Markdown table, one row per algorithm, mean ± std (ddof 1) over seeds."""
    head = ("| algo | seeds | held-out acc before | held-out acc after | final student-teacher KL | "
            "mean w_k at the tool step that went wrong | mean w_k at correct tool steps | "
            "mean w_k after the wrong step |")
    lines = [head, "|" + "---|" * 8]
    for algo, runs in summaries.items():
        lines.append(f"| {algo} | {len(runs)} | {_pm([r['acc_before'] for r in runs])} | "
                     f"{_pm([r['acc_after'] for r in runs])} | {_pm([r['kl_final'] for r in runs], '{:.4f}')} | "
                     f"{_pm([r['w_failed_tool_step'] for r in runs])} | {_pm([r['w_correct_tool_step'] for r in runs])} | "
                     f"{_pm([r['w_after_failed_tool'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, runs in summaries.items():
        steps = sorted({s for r in runs for s, _ in r["curve"]})
        if not steps:
            continue
        by_step = [[dict(r["curve"]).get(s) for r in runs] for s in steps]
        mean = np.array([np.mean([v for v in vs if v is not None]) for vs in by_step])
        std = np.array([np.std([v for v in vs if v is not None]) for vs in by_step])
        ax.plot(steps, mean, marker="o", label=f"{algo} (n={len(runs)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (avg@k)")
    ax.set_title("Demo: held-out accuracy of the student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _complete(run_dir: Path) -> bool:
    return (run_dir / "eval.jsonl").is_file() and (run_dir / "config.yaml").is_file() and \
        (run_dir / "plots").is_dir()


def run_compare(args: Any) -> int:
    out = Path(args.out)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    summaries: dict[str, list[dict]] = {}
    for algo in algos:
        for seed in range(args.seeds):
            run_dir = out / algo / f"seed{seed}"
            if not (args.reuse and _complete(run_dir)):
                cmd = [sys.executable, "-m", "sod_jax.train", "--config", args.config, f"algo.name={algo}",
                       f"train.seed={seed}", f"data.seed={seed}", f"train.out_dir={run_dir}", *args.overrides]
                print(f"== {algo} seed {seed}: {' '.join(cmd[1:])}", flush=True)
                rc = subprocess.call(cmd)
                if rc != 0:
                    print(f"error: the {algo} run with seed {seed} exited with {rc} (see {run_dir})", file=sys.stderr)
                    return rc
            summaries.setdefault(algo, []).append(run_summary(run_dir))
    md = table(summaries)
    cmd_line = f"python -m sod_jax.demo compare --algos {args.algos} --seeds {args.seeds} --config {args.config}"
    if args.overrides:
        cmd_line += " " + " ".join(args.overrides)
    (out / "compare.md").write_text(f"{md}\nMade by `{cmd_line}`.\n")
    png = plot(summaries, out / "compare_acc.png")
    (out / "compare.json").write_text(json.dumps(summaries, indent=1))
    print(md)
    print(f"table: {out / 'compare.md'}; plot: {png}")
    return 0
