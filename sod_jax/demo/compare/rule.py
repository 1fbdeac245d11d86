"""The pre-registered rule of the comparison (``compare plan``, :mod:`sod_jax.demo.compare`): the
pilot's figures, the number of paired seeds, the statistic and the control OPD coefficient, written
as ``rule.json`` and ``rule.md`` before any main run."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sod_jax.demo import stats
from sod_jax.demo.compare.runs import (
    ARMS,
    DEFAULT_CONFIG,
    DEFAULT_HELDOUT,
    PILOT_ARMS,
    RUN_RECORD,
    run_config,
    seed_dirs,
    arm_overrides,
    final_accuracy,
    mean_step_weight,
    resolve_path,
    run_path,
)

PRIMARY = (("sod", "opd"), ("sod", "grpo"))  # the pre-registered comparisons
COMPARISONS = PRIMARY + (("sod", "opd_control"),)
MIN_HELDOUT_PROMPTS = 256
RULE_JSON, RULE_MD = "rule.json", "rule.md"
LEVEL = 0.95


def pilot_figures(pilot_dir: Path) -> dict:
    """The pilot's per-seed final held-out accuracies of SOD, OPD and GRPO (seeds run in all three),
    their paired SOD - OPD / SOD - GRPO differences and SDs, and the SOD runs' mean step weights."""
    pilot_dir = Path(pilot_dir)
    common = set.intersection(*(set(seed_dirs(pilot_dir / a)) for a in PILOT_ARMS))
    acc: dict[str, dict[int, float]] = {a: {} for a in PILOT_ARMS}
    sources = set()
    for a in PILOT_ARMS:
        for s in sorted(common):
            v, src = final_accuracy(run_path(pilot_dir, a, s))
            if v is not None:
                acc[a][s] = v
                sources.add(src)
    seeds = sorted(s for s in common if all(s in acc[a] for a in PILOT_ARMS))
    diffs = {f"{x}-{y}": [acc[x][s] - acc[y][s] for s in seeds] for x, y in PRIMARY}
    sd = {k: (float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan) for k, v in diffs.items()}
    weights = {s: mean_step_weight(run_path(pilot_dir, "sod", s)) for s in seeds}
    settings = [json.loads((run_path(pilot_dir, a, s) / RUN_RECORD).read_text())
                for a in PILOT_ARMS for s in seeds if (run_path(pilot_dir, a, s) / RUN_RECORD).is_file()]
    return {"dir": str(pilot_dir), "seeds": seeds, "acc": {a: {str(s): acc[a][s] for s in seeds} for a in PILOT_ARMS},
            "acc_source": " + ".join(sorted(sources)) or None, "diffs": diffs, "sd": sd,
            "step_weights": {str(s): w for s, w in weights.items()}, "run_records": settings}


def _heldout_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(path)).metadata.num_rows


def make_rule(pilot_dir: Path, min_effect: float, *, config: Optional[str] = None,
              overrides: Optional[Sequence[str]] = None, heldout: str = DEFAULT_HELDOUT, eval_n: int = 4,
              seeds: Optional[Sequence[int]] = None, first_seed: Optional[int] = None, at_least: int = 6,
              at_most: int = 64, bootstrap_reps: int = 10000, bootstrap_seed: int = 0) -> dict:
    """The rule of the comparison, from the pilot (see :mod:`sod_jax.demo.compare`). Raises ValueError when
    the pilot cannot give it (fewer than 2 complete paired seeds, no SOD step weights, a held-out
    set under 256 prompts)."""
    pilot = pilot_figures(pilot_dir)
    if len(pilot["seeds"]) < 2:
        raise ValueError(f"{pilot_dir}: the pilot needs at least 2 seeds run in each of {', '.join(PILOT_ARMS)} "
                         f"(<arm>/seed<k> with a final or periodic evaluation); found {pilot['seeds']}")
    needed = {k: stats.seeds_needed(sd, min_effect, LEVEL, at_least, at_most) for k, sd in pilot["sd"].items()}
    # at the cap with no qualifying n: even at_most seeds give an interval wider than min_effect
    capped = {k: not (math.isfinite(sd) and 2 * stats.t_quantile(needed[k] - 1, LEVEL) * sd / math.sqrt(needed[k])
                      < min_effect) for k, sd in pilot["sd"].items()}
    n = max([at_least, *needed.values()])
    ws = [w for w in pilot["step_weights"].values() if w is not None]
    if not ws:
        raise ValueError(f"{pilot_dir}: the pilot's SOD runs logged no step weights (metrics.jsonl w_mean or "
                         "step_weights.jsonl): the control OPD coefficient cannot be measured")
    # pooled over every assistant step of every pilot SOD run, times the SOD runs' own algo.opd_coef
    # (the distillation term SOD applied is opd_coef * w_k; 1 in the demo config)
    sod_coefs = {float(((run_config(run_path(pilot_dir, "sod", s)) or {}).get("algo") or {}).get("opd_coef", 1.0))
                 for s in pilot["seeds"]}
    if len(sod_coefs) > 1:
        raise ValueError(f"{pilot_dir}: the pilot's SOD runs used different algo.opd_coef values {sorted(sod_coefs)}")
    sod_coef = sod_coefs.pop()
    w_mean = sum(w["w_mean"] * w["steps"] for w in ws) / sum(w["steps"] for w in ws)
    coef = round(sod_coef * w_mean, 6)
    coef_source = " + ".join(sorted({w["source"] for w in ws}))
    if sod_coef != 1.0:
        coef_source = f"algo.opd_coef {sod_coef:g} x the mean w_k ({w_mean:.6g}) from {coef_source}"
    if seeds is None:
        start = max(pilot["seeds"]) + 1 if first_seed is None else int(first_seed)
        seeds = list(range(start, start + n))
    else:
        seeds = [int(s) for s in seeds]
        if len(seeds) < n:
            raise ValueError(f"--seeds gives {len(seeds)} seeds but the rule needs {n}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds repeats a seed: {seeds}")
    hp = resolve_path(heldout)
    if not hp.is_file():
        raise ValueError(f"held-out file {heldout} does not exist")
    n_prompts = _heldout_count(hp)
    if n_prompts < MIN_HELDOUT_PROMPTS:
        raise ValueError(f"held-out file {heldout} has {n_prompts} prompts; the comparison needs at least "
                         f"{MIN_HELDOUT_PROMPTS}")
    recs = pilot.pop("run_records")
    if config is None:
        config = next((r["config"] for r in recs), DEFAULT_CONFIG)
        settings_source = "the pilot's runs (compare_run.json)" if recs else "defaults"
    else:
        settings_source = "compare plan's command line"
    if overrides is None:
        overrides = next((r["overrides"] for r in recs), [])
    else:
        overrides = list(overrides)
    return {
        "version": 1,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "min_effect": float(min_effect),
        "level": LEVEL,
        "primary": [f"{x}-{y}" for x, y in PRIMARY],
        "secondary": [f"{x}-{y}" for x, y in COMPARISONS if (x, y) not in PRIMARY],
        "statistic": {
            "per_seed": "final held-out accuracy (avg@eval_n over the held-out prompts) of arm a minus arm b, "
                        "same seed",
            "primary": "paired t 95% interval of the per-seed differences (mean +/- t_{n-1,0.975} sd/sqrt(n), "
                       "sd with ddof 1)",
            "also": ["hierarchical paired bootstrap 95% percentile interval (seeds with replacement, then "
                     f"prompts within each seed with replacement; {bootstrap_reps} replicates, numpy seed "
                     f"{bootstrap_seed})", "sign count of the per-seed differences (+ / - / ties)"],
            "decision": "SOD better when the paired t interval lies above 0, worse when below 0; no difference "
                        "of the minimum effect or more when it lies inside (-min_effect, +min_effect); else "
                        "undecided (the spread was larger than the pilot's). Each comparison on its own 95% "
                        "interval, no multiplicity adjustment.",
        },
        "pilot": {**pilot, "seeds_needed": needed, "capped": capped},
        "n_seeds_needed": n,
        "n_seeds": len(seeds),
        "at_least": at_least,
        "seeds": seeds,
        "opd_control_coef": coef,
        "opd_control_coef_source": coef_source + " of the pilot's SOD runs, pooled over their assistant steps "
                                                 "(w_1 = 1 included)",
        "config": config,
        "overrides": list(overrides),
        "settings_source": settings_source,
        "arms": {a: arm_overrides(a, coef) for a in ARMS},
        "heldout": str(heldout),
        "heldout_prompts": n_prompts,
        "eval_n": int(eval_n),
        "eval_seed": "the run's seed (eval.seed = train.seed = data.seed)",
        "bootstrap_reps": int(bootstrap_reps),
        "bootstrap_seed": int(bootstrap_seed),
    }


def format_figure(x: Any, fmt: str = "{:.3f}") -> str:
    """``x`` formatted with ``fmt`` for the tables; a dash when missing or not finite."""
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def rule_markdown(rule: dict) -> str:
    """The rule in words (``rule.md``, and copied into ``compare.md``)."""
    p = rule["pilot"]
    lines = [f"## The rule (written {rule['written']}, before the main runs)", "",
             f"- Minimum effect of interest: {rule['min_effect']:.3f} of final held-out accuracy "
             f"({100 * rule['min_effect']:.1f} points).",
             f"- Pilot: {len(p['seeds'])} paired seeds ({', '.join(map(str, p['seeds']))}) in `{p['dir']}`; "
             f"accuracy from {p['acc_source']}."]
    for k in rule["primary"]:
        need = (f"{p['seeds_needed'][k]} seeds, the cap: no number up to it gives a 95% interval narrower than "
                f"{rule['min_effect']:.3f}" if p.get("capped", {}).get(k) else
                f"{p['seeds_needed'][k]} seeds for a 95% interval narrower than {rule['min_effect']:.3f}")
        diffs = ", ".join(format_figure(x) for x in p["diffs"][k])
        lines.append(f"  - {k.upper()}: per-seed differences {diffs}, paired SD "
                     f"{format_figure(p['sd'][k], '{:.4f}')} -> {need}.")
    lines += [f"- Paired seeds: {rule['n_seeds']} (needed: {rule['n_seeds_needed']}, the larger of the two, at "
              f"least {rule['at_least']}); seeds {', '.join(map(str, rule['seeds']))} (train.seed = data.seed = eval.seed: the same data order, "
              "initial student and evaluation draws in every arm of a seed).",
              f"- Per-seed difference: {rule['statistic']['per_seed']}.",
              f"- Statistic: {rule['statistic']['primary']}; also the {rule['statistic']['also'][0]}, and the "
              f"{rule['statistic']['also'][1]}.",
              f"- Decision: {rule['statistic']['decision']}",
              f"- Primary comparisons: {', '.join(k.upper() for k in rule['primary'])}; secondary: "
              f"{', '.join(k.upper() for k in rule['secondary'])}.",
              "- Arms: " + "; ".join(f"{a}: `{' '.join(o)}`" for a, o in rule["arms"].items()) + ".",
              f"- Control OPD coefficient {rule['opd_control_coef']:.6g}: {rule['opd_control_coef_source']}.",
              f"- Runs: `python -m sod_jax.train --config {rule['config']}"
              + (" " + " ".join(rule["overrides"]) if rule["overrides"] else "") + "` + the arm's overrides; "
              f"held-out evaluation of the final student on `{rule['heldout']}` ({rule['heldout_prompts']} prompts "
              f"x {rule['eval_n']} samples).", ""]
    return "\n".join(lines)


def write_rule(out: Path, rule: dict, force: bool = False) -> Path:
    """Write ``rule.json`` and ``rule.md`` into ``out``; an existing rule is kept unless ``force``."""
    out = Path(out)
    path = out / RULE_JSON
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: the rule is fixed before the runs (pass --force to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rule, indent=1))
    (out / RULE_MD).write_text(rule_markdown(rule))
    return path
