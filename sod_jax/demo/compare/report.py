"""The comparison's table (``compare table``, :mod:`sod_jax.demo.compare`): everything from the files
under the comparison directory: per-arm figures, the paired differences and the rule's verdicts
(``compare.md``, ``compare.json``), the accuracy plot (``compare_acc.png``) and the step-weight plot
(``compare_weights.png``: ``d_1`` and SOD's mean ``w_k`` at correct tool steps against RL step)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sod_jax.demo import stats
from sod_jax.demo.compare.rule import COMPARISONS, LEVEL, PRIMARY, RULE_JSON, RULE_MD, format_figure, rule_markdown
from sod_jax.demo.compare.runs import (
    ARMS,
    EVAL_DIR,
    run_config,
    seed_dirs,
    eval_complete,
    final_eval,
    heldout_prompts,
    mean_step_weight,
    resolve_path,
    run_path,
    run_summary,
)


def _pm(values: Sequence[Optional[float]], fmt: str = "{:.3f}") -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(np.mean(v))} ± {fmt.format(np.std(v, ddof=1))}"


def table(summaries: dict[str, list[dict]]) -> str:
    """Markdown table of the training figures (:func:`run_summary`), one row per arm, mean ± std
    (ddof 1) over seeds."""
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
    """Periodic held-out accuracy against RL step, mean and ±1 std band over seeds per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, runs in summaries.items():
        _band(ax, runs, "curve", algo, marker="o")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (avg@k)")
    ax.set_title("Demo: held-out accuracy of the student")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _band(ax, runs: Sequence[dict], key: str, label: str, **style: Any) -> bool:
    """Plot the mean and ±1 std band over ``runs`` of their ``key`` curves (``(step, value)``);
    False when no run has one."""
    curves = [dict(r.get(key) or []) for r in runs]
    steps = sorted({s for c in curves for s in c})
    if not steps:
        return False
    vals = [[c[s] for c in curves if s in c] for s in steps]
    mean = np.array([np.mean(v) for v in vals])
    std = np.array([np.std(v) for v in vals])
    ax.plot(steps, mean, label=f"{label} (n={sum(1 for c in curves if c)})", **style)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    return True


def plot_weights(summaries: dict[str, list[dict]], path: Path) -> Optional[Path]:
    """The step-weight figures over training: ``d_1`` (batch mean per RL step) of every arm that has a
    teacher, and SOD's mean ``w_k`` at correct tool steps (its step-weight samples); mean and ±1 std
    band over seeds. None (no file) when no run logged either."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_w) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = [_band(ax_d, runs, "d1_curve", algo) for algo, runs in summaries.items()]
    drawn.append(_band(ax_w, summaries.get("sod", []), "w_ok_curve", "sod"))
    if not any(drawn):
        plt.close(fig)
        return None
    ax_d.set_title("d_1: turn 1's student-teacher divergence")
    ax_w.set_title("SOD: mean w_k at correct tool steps")
    ax_w.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (ax_d, ax_w):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, path)


def verdict(t_ci: dict, min_effect: Optional[float], complete: bool) -> str:
    """The rule's decision from the paired t interval (``complete``: every rule seed is in)."""
    lo, hi = t_ci["lo"], t_ci["hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "—"
    if lo > 0:
        v = "SOD better"
    elif hi < 0:
        v = "SOD worse"
    elif min_effect is not None and -min_effect < lo and hi < min_effect:
        v = f"no difference of {min_effect:.3f} or more"
    else:
        v = "undecided"
    return v if complete else f"interim only ({v})"


def paired_comparison(runs: dict[str, dict[int, dict]], a: str, b: str, seeds: Sequence[int], *,
                      reps: int = 10000, boot_seed: int = 0) -> Optional[dict]:
    """The paired ``a - b`` figures over the ``seeds`` where both arms have a final evaluation:
    per-seed differences, paired t and bootstrap intervals (over the prompts both evaluated), sign count."""
    both = [s for s in seeds if runs.get(a, {}).get(s, {}).get("final") and runs.get(b, {}).get(s, {}).get("final")]
    if not both:
        return None
    diffs, xa, xb = [], [], []
    for s in both:
        fa, fb = runs[a][s]["final"], runs[b][s]["final"]
        common = sorted(set(fa["per_prompt"]) & set(fb["per_prompt"]), key=str)
        pa = np.array([fa["per_prompt"][p] for p in common])
        pb = np.array([fb["per_prompt"][p] for p in common])
        xa.append(pa)
        xb.append(pb)
        diffs.append(float(pa.mean() - pb.mean()))
    return {"seeds": both, "diffs": diffs, "t": stats.paired_t_interval(diffs, LEVEL),
            "bootstrap": stats.bootstrap_interval(xa, xb, reps=reps, level=LEVEL, seed=boot_seed),
            "signs": list(stats.sign_count(diffs))}


def collect(out: Path, rule: Optional[dict]) -> tuple[dict[str, dict[int, dict]], list[int]]:
    """Every run under ``out`` of the rule's seeds (all seed dirs without a rule): ``{arm: {seed:
    run_summary + {"final": final_eval or None, "w_mean_all": mean_step_weight}}}`` and the seeds."""
    out = Path(out)
    seeds = list(rule["seeds"]) if rule else sorted({s for a in ARMS for s in seed_dirs(out / a)})
    prompts_cache: dict[str, Optional[dict]] = {}

    def prompts_for(rd: Path) -> Optional[dict]:
        path = rule["heldout"] if rule else None
        if path is None:
            cfg = run_config(rd / EVAL_DIR) or {}
            files = (cfg.get("eval") or {}).get("files") or []
            path = files[0] if files else None
        if path is None:
            return None
        if path not in prompts_cache:
            p = resolve_path(path)
            prompts_cache[path] = heldout_prompts(p) if p.is_file() else None
        return prompts_cache[path]

    runs: dict[str, dict[int, dict]] = {}
    for arm in ARMS:
        for s in seeds:
            rd = run_path(out, arm, s)
            if not rd.is_dir():
                continue
            summary = run_summary(rd)
            summary["final"] = final_eval(rd, prompts_for(rd)) if eval_complete(rd) else None
            summary["w_mean_all"] = mean_step_weight(rd) if arm == "sod" else None
            runs.setdefault(arm, {})[s] = summary
    return runs, seeds


def _recovery(runs: dict[int, dict]) -> tuple[str, Optional[dict]]:
    recs = [r["final"]["recovery"] for r in runs.values() if r.get("final") and r["final"].get("recovery")]
    if not recs:
        return "—", None
    errors = sum(r["errors"] for r in recs)
    recovered = sum(r["recovered"] for r in recs)
    rates = [r["rate"] for r in recs if r["rate"] is not None]
    pooled = recovered / errors if errors else None
    cell = f"{format_figure(pooled)} ({recovered}/{errors})" + (f"; per seed {_pm(rates)}" if len(rates) > 1 else "")
    return cell, {"errors": errors, "recovered": recovered, "rate": pooled, "per_seed": rates}


def build_report(out: Path) -> tuple[str, dict]:
    """``(compare.md text, compare.json object)`` from the files under ``out`` alone."""
    out = Path(out)
    rule = json.loads((out / RULE_JSON).read_text()) if (out / RULE_JSON).is_file() else None
    runs, seeds = collect(out, rule)
    min_effect = rule["min_effect"] if rule else None
    reps = rule["bootstrap_reps"] if rule else 10000
    boot_seed = rule["bootstrap_seed"] if rule else 0
    lines = ["# Demo comparison: SOD vs OPD vs GRPO (and OPD at SOD's mean weight)", ""]
    if rule:
        lines.append((out / RULE_MD).read_text() if (out / RULE_MD).is_file() else rule_markdown(rule))
    else:
        lines += [f"No {RULE_JSON} in {out}: an exploratory table (no pre-registered rule, no verdicts).", ""]

    lines += ["## Arms", "",
              "Final held-out accuracy: the final student on the held-out set (mean ± sd over seeds). Before / "
              "last periodic: the RL loop's periodic evaluations. Recovery: of the final-eval samples with a failed "
              "check, the fraction that later produced the failed step's true value (pooled; recovered / with an "
              "error). d_1 and w_k: over training, from the step-weight samples; every arm with a teacher logs the "
              "step weights SOD would give, and only the SOD arm applies them (OPD's steps all weigh 1).", "",
              "| arm | seeds (final eval) | final held-out acc | acc before (periodic) | last periodic acc | "
              "final student-teacher KL | recovery after an error | mean d_1 | mean w_k at correct tool steps | "
              "mean w_k at the wrong step |", "|" + "---|" * 10]
    arms_json = {}
    for arm in ARMS:
        rs = runs.get(arm, {})
        if not rs:
            continue
        finals = [r["final"]["acc"] for r in rs.values() if r.get("final")]
        rec_cell, rec = _recovery(rs)
        vals = list(rs.values())
        lines.append(f"| {arm} | {len(finals)} of {len(seeds)} | {_pm(finals)} | "
                     f"{_pm([r['acc_before'] for r in vals])} | "
                     f"{_pm([r['acc_after'] for r in vals])} | {_pm([r['kl_final'] for r in vals], '{:.4f}')} | "
                     f"{rec_cell} | {_pm([r['d1_mean'] for r in vals], '{:.4f}')} | "
                     f"{_pm([r['w_correct_tool_step'] for r in vals])} | "
                     f"{_pm([r['w_failed_tool_step'] for r in vals])} |")
        arms_json[arm] = {"final_acc": finals, "recovery": rec}

    lines += ["", "## Paired differences", "",
              "Per seed: final held-out accuracy of the first arm minus the second's. Paired t and bootstrap "
              "(seeds, then prompts within seeds) 95% intervals; sign count + / - / ties.", "",
              "| comparison | seeds | mean difference | paired t 95% | bootstrap 95% | signs + / - / 0 | verdict |",
              "|" + "---|" * 7]
    comps = {}
    for a, b in COMPARISONS:
        c = paired_comparison(runs, a, b, seeds, reps=reps, boot_seed=boot_seed)
        key = f"{a}-{b}"
        if c is None:
            lines.append(f"| {key.upper()} | 0 | — | — | — | — | — |")
            continue
        complete = bool(rule) and len(c["seeds"]) >= len(seeds)
        c["verdict"] = verdict(c["t"], min_effect, complete) if rule else "—"
        if rule and (a, b) not in PRIMARY:
            c["verdict"] = c["verdict"] + " (secondary)" if c["verdict"] != "—" else "—"
        t, bs = c["t"], c["bootstrap"]
        lines.append(f"| {key.upper()} | {len(c['seeds'])} | {format_figure(t['mean'], '{:+.3f}')} | "
                     f"[{format_figure(t['lo'], '{:+.3f}')}, {format_figure(t['hi'], '{:+.3f}')}] | "
                     f"[{format_figure(bs['lo'], '{:+.3f}')}, {format_figure(bs['hi'], '{:+.3f}')}] | "
                     f"{c['signs'][0]} / {c['signs'][1]} / {c['signs'][2]} | {c['verdict']} |")
        comps[key] = c

    sod = runs.get("sod", {})
    if sod:
        lines += ["", "## SOD runs: step weights over training", "",
                  "| seed | final held-out acc | mean d_1 | mean w_k at correct tool steps | mean w_k at the wrong "
                  "step | mean w_k after it | mean w_k, all steps |", "|" + "---|" * 7]
        for s, r in sorted(sod.items()):
            wm = r["w_mean_all"]
            final = r["final"]["acc"] if r.get("final") else None
            lines.append(f"| {s} | {format_figure(final)} | {format_figure(r['d1_mean'], '{:.4f}')} | "
                         f"{format_figure(r['w_correct_tool_step'])} | {format_figure(r['w_failed_tool_step'])} | "
                         f"{format_figure(r['w_after_failed_tool'])} | {format_figure(wm['w_mean'] if wm else None)} |")
    lines += ["", "![held-out accuracy against RL step](compare_acc.png)", ""]
    if any(r.get("d1_curve") or r.get("w_ok_curve") for rs in runs.values() for r in rs.values()):
        # plot_weights draws compare_weights.png from these curves, and only when a run has one
        lines += ["![d_1 and SOD's mean w_k at correct tool steps against RL step](compare_weights.png)", ""]
    lines += [f"Rebuilt from the run directories by `python -m sod_jax.demo compare table --out {out}`.", ""]
    doc = {"rule": rule, "seeds": seeds, "arms": arms_json, "comparisons": comps,
           "runs": {arm: {str(s): r for s, r in rs.items()} for arm, rs in runs.items()}}
    return "\n".join(lines), doc


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def write_report(out: Path) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.json``, ``compare_acc.png`` and (when a run logged step weights)
    ``compare_weights.png`` into ``out``; their paths."""
    out = Path(out)
    md, doc = build_report(out)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps(_json_safe(doc), indent=1))
    curves = {arm: list(rs.values()) for arm, rs in doc["runs"].items()}
    png = plot(curves, out / "compare_acc.png")
    weights_png = plot_weights(curves, out / "compare_weights.png")
    return {"md": out / "compare.md", "json": out / "compare.json", "png": png, "weights_png": weights_png}
