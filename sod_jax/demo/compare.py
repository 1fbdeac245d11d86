"""``python -m sod_jax.demo compare``: SOD vs OPD vs GRPO from the demo student, decided by a rule
written down before the runs.

Three steps, each reading and writing files only, so the comparison resumes across working
sessions and every figure can be rebuilt from the run directories:

1. ``compare run --seeds 0,1,2 --arms sod,opd,grpo --out PILOT``: the pilot (no rule yet).
2. ``compare plan --pilot-dir PILOT --min-effect 0.04 --out DIR``: writes ``DIR/rule.json`` and
   ``DIR/rule.md`` before any main run: the minimum effect of interest, the pilot's paired
   standard deviations of the SOD - OPD and SOD - GRPO final held-out accuracy, the number of
   paired seeds (:func:`sod_jax.demo.stats.seeds_needed`, the larger of the two, at least 6), the
   statistic, the fixed seed list (by default the seeds after the pilot's, so the pilot that chose
   the sample size is not part of the test), the run settings and the control OPD coefficient.
   An existing ``rule.json`` is never replaced without ``--force``.
3. ``compare run --rule DIR/rule.json --out DIR``: every arm x every rule seed, then
   ``compare table --out DIR``: the table, ``compare.json`` and the plot.

The arms. Each (arm, seed) is one ordinary ``python -m sod_jax.train --config CONFIG [overrides]
algo.name=... train.seed=S data.seed=S train.out_dir=DIR/<arm>/seed<S>`` run (same data order and
initial student per seed in every arm):

* ``grpo``: ``algo.name=grpo`` (outcome reward only, no teacher);
* ``opd``: ``algo.name=opd``. In this code base OPD *is* SOD with every ``w_k = 1``: the per-token
  advantage of ``opd`` is ``A m + c (q - s) m`` and that of ``sod`` is ``A m + c w (q - s) m``
  (:func:`sod_jax.algo.advantages.token_advantages`; the modes differ only in ``weights="step"``
  in :data:`sod_jax.algo.modes.TABLE`), with the same ``c = algo.opd_coef`` (1 in the demo config);
* ``sod``: ``algo.name=sod``;
* ``opd_control``: ``algo.name=opd algo.opd_coef=c0`` with ``c0`` the mean SOD step weight of the
  pilot's SOD runs (:func:`mean_step_weight`): OPD with the same average distillation strength as
  SOD, so a SOD gain that is only a smaller overall distillation weight shows up as no SOD -
  opd_control difference.

After training, the final student is exported (``python -m sod_jax.convert orbax-to-hf --ckpt
RUN/checkpoints --step TOTAL --out RUN/model``; the RL loop writes orbax checkpoints only) and
evaluated once on the held-out parquet (``python -m sod_jax.eval``, >= 256 prompts, ``eval.n``
samples each) into ``RUN/final_eval`` (``generations.jsonl``, ``summary.json``), with
``eval.seed`` = the run's seed, so every arm of a seed gets the same evaluation draws. Each phase
is skipped when its output is complete (:func:`train_complete`, :func:`export_complete`,
:func:`eval_complete`); the train and eval CLIs resume a half-done phase themselves.
``RUN/compare_run.json`` records the commands.

Everything reported is read back from the run directories (DESIGN §5):

* final held-out accuracy: per prompt the mean of its samples' ``acc`` in
  ``final_eval/generations.jsonl``, then the mean over prompts (avg@n);
* the paired differences SOD - OPD, SOD - GRPO (the two pre-registered comparisons) and SOD -
  opd_control, per seed, with the paired t 95% interval, the hierarchical bootstrap 95% interval
  (seeds, then prompts within seeds) and the sign count (:mod:`sod_jax.demo.stats`);
* the recovery rate after an error per arm: over the final-eval samples whose trajectory had a
  failed check, the fraction that later produced the failed step's true value
  (``error_recovery(prompt_text, tool_outputs)`` of the sample's task, :func:`recovery_function`:
  ``sod_jax.demo.task`` for demo_chain, ``sod_jax.demo.check_task`` for demo_check; the prompt text
  comes from the held-out parquet by ``prompt_id``, the tool outputs of each turn from the sample's
  response text, :func:`response_tool_outputs`);
* from the periodic evaluations of the RL loop (``eval.jsonl``): held-out accuracy before and
  after, the accuracy-vs-step plot, the final student-teacher KL (``heldout_kl``; GRPO loads no
  teacher, so it has none);
* from ``step_weights.jsonl`` (a bounded sample of trajectories per step: ``d`` and ``w`` per turn,
  the prompt and the tool outputs): the mean ``d_1`` over training, and the mean step weight
  ``w_k`` (turns 2 and later; ``w_1`` is 1 by definition) at the tool step where a trajectory
  first went wrong, at correct tool steps, and at the turns after the wrong step (a demo_chain
  tool step is wrong when its output is not the step's true value, :func:`step_failures`).

``compare table`` writes ``compare.md`` (the rule, copied from ``rule.md``, next to the tables),
``compare.json`` and ``compare_acc.png`` (held-out accuracy against step, mean with a ±1 std band
per arm) into ``--out``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sod_jax.demo import stats
from sod_jax.demo.task import failed_steps, parse_problem
from sod_jax.tracking import read_jsonl

ARMS = ("grpo", "opd", "sod", "opd_control")
PILOT_ARMS = ("sod", "opd", "grpo")
PRIMARY = (("sod", "opd"), ("sod", "grpo"))  # the pre-registered comparisons
COMPARISONS = PRIMARY + (("sod", "opd_control"),)
DEFAULT_CONFIG = "configs/demo.yaml"
DEFAULT_HELDOUT = "sod_jax/demo/assets/data/heldout.parquet"
MIN_HELDOUT_PROMPTS = 256
RULE_JSON, RULE_MD = "rule.json", "rule.md"
EXPORT_DIR, EVAL_DIR = "model", "final_eval"
EXPORT_MARK, RUN_RECORD = "model_export.json", "compare_run.json"
LEVEL = 0.95
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding sod_jax/ and configs/


# ---------------------------------------------------------------------------------------------
# Reading one run directory
# ---------------------------------------------------------------------------------------------


def eval_acc(record: dict) -> Optional[float]:
    """Mean ``acc`` over the data sources of one ``eval.jsonl`` record."""
    accs = [v["acc"] for v in record.values() if isinstance(v, dict) and isinstance(v.get("acc"), (int, float))]
    return float(np.mean(accs)) if accs else None


def step_failures(sample: dict) -> list[bool]:
    """Per assistant turn of one ``step_weights.jsonl`` trajectory sample: did its tool step fail?

    A demo_chain prompt (``prompt`` parses as a chain) fails at turn k when the tool output after it
    is not the step's true value (a miscopied operand, a wrong expression, no call); this is the
    cascade's start, since later steps copy the wrong value. A demo_check prompt: a failed check, a
    wrong value or a call past the end (:func:`sod_jax.demo.check_task.failed_steps`). Other
    prompts: ``failed_steps`` when the writer gave them, else every turn counts as failed when the
    trajectory had a tool error and none otherwise."""

    if sample.get("failed_steps") is not None:
        return [bool(x) for x in sample["failed_steps"]]
    if sample.get("tool_outputs") is not None:
        problem = parse_problem(sample.get("prompt") or "")
        if problem is not None:
            return failed_steps(problem, sample["tool_outputs"])
        from sod_jax.demo import check_task

        problem = check_task.parse_problem(sample.get("prompt") or "")
        if problem is not None:
            return check_task.failed_steps(problem, sample["tool_outputs"])
    n = len(sample.get("w") or [])
    return [sample.get("tool_errors", 0) > 0] * n


def run_summary(run_dir: Path) -> dict:
    """The training figures of one run directory (None where the run has no such record):
    periodic held-out accuracy (``curve`` of ``(step, acc)``, before / after), the final held-out
    KL, the mean ``w_k`` at the failed tool step / correct tool steps / after the failed step, and
    the mean ``d_1`` (``d1_mean``) over the ``step_weights.jsonl`` samples."""
    run_dir = Path(run_dir)
    evals = read_jsonl(run_dir / "eval.jsonl")
    curve = [(int(r["step"]), eval_acc(r)) for r in evals if eval_acc(r) is not None]
    kl = [r["heldout_kl"] for r in evals if isinstance(r.get("heldout_kl"), (int, float))]
    at_fail, at_ok, after_fail, d1 = [], [], [], []
    for rec in read_jsonl(run_dir / "step_weights.jsonl"):
        for t in rec.get("trajectories", []):
            w = t.get("w") or []
            d = t.get("d") or []
            if d:
                d1.append(d[0])
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
        "d1_mean": float(np.mean(d1)) if d1 else None,
    }


def mean_step_weight(run_dir: Path) -> Optional[dict]:
    """The mean SOD step weight ``w_k`` over every assistant step of a run's training (``w_1 = 1``
    included), or None when the run logged none.

    Source, in order: ``metrics.jsonl``'s ``w_mean`` per RL step (the mean of ``w_k`` over all
    assistant steps of the step's whole batch, :func:`sod_jax.algo.losses.step_weight_stats`),
    averaged over steps weighted by each step's number of assistant steps (``sum(step_count_by_k)``;
    equal weights when absent), i.e. the mean over all assistant steps of training; else the
    ``w`` lists of ``step_weights.jsonl`` (a sample of 8 trajectories per step), pooled.

    This is the per-step mean the SOD loss applied (every token of step k gets ``w_k``); a
    per-token mean would weight long steps more but the files do not hold per-step lengths.
    Returns ``{"w_mean", "steps", "source"}`` (``steps``: assistant steps it averages over)."""
    run_dir = Path(run_dir)
    total = count = 0.0
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        w = m.get("w_mean")
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            continue
        c = m.get("step_count_by_k")
        c = float(sum(c)) if isinstance(c, list) and c else 1.0
        total += w * c
        count += c
    if count > 0:
        return {"w_mean": total / count, "steps": count, "source": "metrics.jsonl w_mean"}
    ws = [x for rec in read_jsonl(run_dir / "step_weights.jsonl") for t in rec.get("trajectories", [])
          for x in (t.get("w") or [])]
    if ws:
        return {"w_mean": float(np.mean(ws)), "steps": float(len(ws)), "source": "step_weights.jsonl w"}
    return None


_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.S)
_TURN_START = "<|im_start|>assistant"
_TURN_END = "<|im_end|>"


def response_tool_outputs(text: str) -> list[Optional[str]]:
    """Per assistant turn of a response text (the eval's ``response``: the decoded response tokens,
    assistant and tool alike): the text of the tool responses after the turn (several joined by
    newlines), or None when none followed. Turns are split at the template's ``<|im_start|>assistant``
    generation prompts; a turn's tool responses are what follows its first ``<|im_end|>``."""
    out: list[Optional[str]] = []
    for seg in text.split(_TURN_START):
        _, sep, after = seg.partition(_TURN_END)
        found = _TOOL_RESPONSE.findall(after) if sep else []
        out.append("\n".join(found) if found else None)
    return out


def heldout_prompts(path: Any) -> dict[int, str]:
    """Row position -> user prompt text of a held-out parquet (the eval's ``prompt_id`` is the row
    position, :func:`sod_jax.data.load_rows`)."""
    import pyarrow.parquet as pq

    out = {}
    for i, row in enumerate(pq.read_table(str(path)).to_pylist()):
        user = [m.get("content", "") for m in (row.get("prompt") or []) if m.get("role") == "user"]
        out[i] = user[-1] if user else ""
    return out


# data_source -> the module whose ``error_recovery(prompt_text, tool_outputs)`` reads its trajectories
RECOVERY_MODULES = {"demo_chain": "sod_jax.demo.task", "demo_check": "sod_jax.demo.check_task"}


def recovery_function(data_source: Optional[str]) -> Optional[Callable]:
    """``error_recovery`` of the task of ``data_source`` (imported when first needed; other sources:
    :mod:`sod_jax.demo.task`'s), or None when that module has none."""
    import importlib

    try:
        mod = importlib.import_module(RECOVERY_MODULES.get(data_source or "", "sod_jax.demo.task"))
    except ImportError:
        return None
    return getattr(mod, "error_recovery", None)


def read_eval(eval_dir: Path, prompts: Optional[dict] = None) -> Optional[dict]:
    """The figures of one ``python -m sod_jax.eval`` output directory (``generations.jsonl``), or None
    when it holds no samples.

    Returns ``{"acc", "per_prompt": {prompt_id: mean acc of its samples}, "samples", "length_finishes",
    "recovery": {"errors", "recovered", "rate"} or None}``; ``acc`` is the mean of ``per_prompt``.
    ``prompts`` (prompt_id -> prompt text) enables the recovery count (also needs the task's
    ``error_recovery``, :func:`recovery_function`)."""
    path = Path(eval_dir) / "generations.jsonl"
    if not path.is_file():
        return None
    by_prompt: dict[Any, list[float]] = {}
    recoverers: dict[Any, Optional[Callable]] = {}
    errors = recovered = 0
    recs = read_jsonl(path)
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], []).append(float(bool(r.get("acc"))))
        if prompts is None:
            continue
        src = r.get("data_source")
        if src not in recoverers:
            recoverers[src] = recovery_function(src)
        if recoverers[src] is not None:
            res = recoverers[src](prompts.get(r["prompt_id"], ""), response_tool_outputs(r.get("response") or ""))
            if res is not None:
                errors += 1
                recovered += int(bool(res))
    if not by_prompt:
        return None
    per_prompt = {p: float(np.mean(v)) for p, v in by_prompt.items()}
    rec = None
    if any(f is not None for f in recoverers.values()):
        rec = {"errors": errors, "recovered": recovered, "rate": recovered / errors if errors else None}
    return {"acc": float(np.mean(list(per_prompt.values()))), "per_prompt": per_prompt, "samples": len(recs),
            "length_finishes": float(np.mean([r.get("finish_reason") == "length" for r in recs])),
            "recovery": rec}


def final_eval(run_dir: Path, prompts: Optional[dict] = None) -> Optional[dict]:
    """The final held-out evaluation of a run (``RUN/final_eval``, :func:`read_eval`), or None when
    not complete."""
    if not eval_complete(run_dir):
        return None
    return read_eval(Path(run_dir) / EVAL_DIR, prompts)


def final_accuracy(run_dir: Path) -> tuple[Optional[float], Optional[str]]:
    """``(acc, source)``: the final held-out evaluation's accuracy when complete (``"final_eval"``),
    else the last periodic evaluation's (``"eval.jsonl"``), else ``(None, None)``."""
    fe = final_eval(run_dir)
    if fe is not None:
        return fe["acc"], "final_eval"
    s = run_summary(run_dir)
    if s["acc_after"] is not None:
        return s["acc_after"], "eval.jsonl"
    return None, None


# ---------------------------------------------------------------------------------------------
# Running: completeness, commands, resumption
# ---------------------------------------------------------------------------------------------


def run_path(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed{seed}"


def _run_config(run_dir: Path) -> Optional[dict]:
    import yaml

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return None
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        return None


def _total_steps(run_dir: Path) -> Optional[int]:
    cfg = _run_config(run_dir)
    try:
        return int(cfg["train"]["total_steps"])
    except (TypeError, KeyError, ValueError):
        return None


def _checkpoint_dir(run_dir: Path) -> Path:
    cfg = _run_config(run_dir) or {}
    d = (cfg.get("checkpoint") or {}).get("dir")
    return Path(d) if d else Path(run_dir) / "checkpoints"


def train_complete(run_dir: Path) -> bool:
    """The RL run finished: its ``config.yaml`` names ``train.total_steps`` and ``metrics.jsonl``
    holds that step."""
    total = _total_steps(run_dir)
    if total is None:
        return False
    return any(r.get("step") == total for r in read_jsonl(Path(run_dir) / "metrics.jsonl"))


def export_complete(run_dir: Path) -> bool:
    """The final student was exported to ``RUN/model`` (its marker ``model_export.json`` is written
    after the export succeeded)."""
    return (Path(run_dir) / EXPORT_MARK).is_file() and (Path(run_dir) / EXPORT_DIR / "config.json").is_file()


def eval_complete(run_dir: Path) -> bool:
    """The final evaluation finished (the eval CLI writes ``summary.json`` last)."""
    d = Path(run_dir) / EVAL_DIR
    return (d / "summary.json").is_file() and (d / "generations.jsonl").is_file()


def arm_overrides(arm: str, control_coef: Optional[float] = None) -> list[str]:
    """The ``algo.*`` overrides of an arm (see the module docstring)."""
    if arm == "opd_control":
        if control_coef is None:
            raise ValueError("the opd_control arm needs the rule's coefficient (compare plan, then run --rule)")
        return ["algo.name=opd", f"algo.opd_coef={control_coef}"]
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return [f"algo.name={arm}"]


def train_cmd(config: str, arm: str, seed: int, run_dir: Path, overrides: Sequence[str] = (),
              control_coef: Optional[float] = None) -> list[str]:
    """The train command of one (arm, seed); the compare-controlled settings come last so they win."""
    return [sys.executable, "-m", "sod_jax.train", "--config", str(resolve_path(config)), *overrides,
            *arm_overrides(arm, control_coef), f"train.seed={seed}", f"data.seed={seed}", f"train.out_dir={run_dir}"]


def export_cmd(run_dir: Path, step: int) -> list[str]:
    """Export the final checkpoint (``step`` = the run's ``train.total_steps``) as an HF model."""
    return [sys.executable, "-m", "sod_jax.convert", "orbax-to-hf", "--ckpt", str(_checkpoint_dir(run_dir)),
            "--step", str(step), "--out", str(Path(run_dir) / EXPORT_DIR), "--no-progress"]


def eval_ks(n: int) -> list[int]:
    return sorted({1, 4, int(n)} & set(range(1, int(n) + 1)))


def eval_cmd(config: str, run_dir: Path, seed: int, heldout: str, eval_n: int,
             overrides: Sequence[str] = ()) -> list[str]:
    """The final held-out evaluation of one run, with ``eval.seed`` = the run's seed (the same
    evaluation draws for every arm of a seed)."""
    return [sys.executable, "-m", "sod_jax.eval", "--config", str(resolve_path(config)), "--no-progress", *overrides,
            f"model.path={Path(run_dir) / EXPORT_DIR}", "eval.files=" + json.dumps([str(resolve_path(heldout))]),
            f"eval.n={eval_n}", "eval.ks=" + json.dumps(eval_ks(eval_n)), f"eval.seed={seed}",
            f"eval.out_dir={Path(run_dir) / EVAL_DIR}"]


def _call(cmd: list[str]) -> int:
    """Run one CLI (the tests replace this)."""
    return subprocess.call(cmd)


def resolve_path(path: str) -> Path:
    """``path`` as given when it exists, else relative to the checkout (rule files name repo paths)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    q = _PACKAGE_ROOT / p
    return q if q.exists() else p


def run_one(out: Path, arm: str, seed: int, *, config: str, overrides: Sequence[str], heldout: str, eval_n: int,
            control_coef: Optional[float] = None) -> int:
    """Train, export and evaluate one (arm, seed), skipping each phase already complete; 0 or the
    failing command's exit status."""
    rd = run_path(out, arm, seed)
    record = {"arm": arm, "seed": seed, "config": config, "overrides": list(overrides),
              "arm_overrides": arm_overrides(arm, control_coef), "heldout": str(heldout), "eval_n": int(eval_n),
              "eval_seed": seed}
    rec_path = rd / RUN_RECORD
    if rec_path.is_file():
        old = json.loads(rec_path.read_text())
        record.update({k: v for k, v in old.items() if k.endswith("_cmd")})  # the commands of earlier sessions
        diff = [k for k in ("config", "overrides", "arm_overrides", "heldout", "eval_n", "eval_seed")
                if old.get(k) != record[k]]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} there vs {record[k]!r} now" for k in diff)
            print(f"error: {rd} was made with other settings ({what}); use another --out or remove that run "
                  "directory", file=sys.stderr)
            return 2
    phases = []
    if not train_complete(rd):
        phases.append(("train", lambda: train_cmd(config, arm, seed, rd, overrides, control_coef)))
    if not export_complete(rd):
        phases.append(("export", lambda: export_cmd(rd, _total_steps(rd))))
    if not eval_complete(rd):
        phases.append(("eval", lambda: eval_cmd(config, rd, seed, heldout, eval_n, overrides)))
    if not phases:
        print(f"== {arm} seed {seed}: complete ({rd}), skipped", flush=True)
        return 0
    rd.mkdir(parents=True, exist_ok=True)
    for name, make in phases:
        if name == "export" and _total_steps(rd) is None:
            print(f"error: {rd}/config.yaml names no train.total_steps: cannot export", file=sys.stderr)
            return 2
        cmd = make()
        record[f"{name}_cmd"] = cmd[1:]
        rec_path.write_text(json.dumps(record, indent=1))
        print(f"== {arm} seed {seed} {name}: {' '.join(cmd[1:])}", flush=True)
        rc = _call(cmd)
        if rc != 0:
            print(f"error: the {name} of {arm} seed {seed} exited with {rc} (see {rd}); rerun the same command "
                  "to resume", file=sys.stderr)
            return rc
        if name == "train" and not train_complete(rd):
            print(f"error: the {arm} seed {seed} run stopped before its last step (see {rd}); rerun to resume",
                  file=sys.stderr)
            return 1
        if name == "export":
            (rd / EXPORT_MARK).write_text(json.dumps({"step": _total_steps(rd), "cmd": cmd[1:]}))
    return 0


def run_arms(out: Path, arms: Sequence[str], seeds: Sequence[int], **settings: Any) -> int:
    """Every arm for every seed, seed by seed (complete pairs accumulate first)."""
    for seed in seeds:
        for arm in arms:
            rc = run_one(out, arm, seed, **settings)
            if rc != 0:
                return rc
    return 0


# ---------------------------------------------------------------------------------------------
# The rule (compare plan)
# ---------------------------------------------------------------------------------------------


def _seed_dirs(arm_dir: Path) -> list[int]:
    if not arm_dir.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in arm_dir.iterdir() if p.is_dir() and re.fullmatch(r"seed\d+", p.name))


def pilot_figures(pilot_dir: Path) -> dict:
    """The pilot's per-seed final held-out accuracies of SOD, OPD and GRPO (seeds run in all three),
    their paired SOD - OPD / SOD - GRPO differences and SDs, and the SOD runs' mean step weights."""
    pilot_dir = Path(pilot_dir)
    common = set.intersection(*(set(_seed_dirs(pilot_dir / a)) for a in PILOT_ARMS))
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
    """The rule of the comparison, from the pilot (see the module docstring). Raises ValueError when
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
    sod_coefs = {float(((_run_config(run_path(pilot_dir, "sod", s)) or {}).get("algo") or {}).get("opd_coef", 1.0))
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


def _f(x: Any, fmt: str = "{:.3f}") -> str:
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
        lines.append(f"  - {k.upper()}: per-seed differences {', '.join(_f(x) for x in p['diffs'][k])}, paired SD "
                     f"{_f(p['sd'][k], '{:.4f}')} -> {need}.")
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


# ---------------------------------------------------------------------------------------------
# The table (compare table): everything from the files
# ---------------------------------------------------------------------------------------------


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
    seeds = list(rule["seeds"]) if rule else sorted({s for a in ARMS for s in _seed_dirs(out / a)})
    prompts_cache: dict[str, Optional[dict]] = {}

    def prompts_for(rd: Path) -> Optional[dict]:
        path = rule["heldout"] if rule else None
        if path is None:
            cfg = _run_config(rd / EVAL_DIR) or {}
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
    cell = f"{_f(pooled)} ({recovered}/{errors})" + (f"; per seed {_pm(rates)}" if len(rates) > 1 else "")
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
              "error). d_1 and w_k: over training, from the step-weight samples.", "",
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
        lines.append(f"| {key.upper()} | {len(c['seeds'])} | {_f(t['mean'], '{:+.3f}')} | "
                     f"[{_f(t['lo'], '{:+.3f}')}, {_f(t['hi'], '{:+.3f}')}] | "
                     f"[{_f(bs['lo'], '{:+.3f}')}, {_f(bs['hi'], '{:+.3f}')}] | "
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
            lines.append(f"| {s} | {_f(final)} | {_f(r['d1_mean'], '{:.4f}')} | "
                         f"{_f(r['w_correct_tool_step'])} | {_f(r['w_failed_tool_step'])} | "
                         f"{_f(r['w_after_failed_tool'])} | {_f(wm['w_mean'] if wm else None)} |")
    lines += ["", "![held-out accuracy against RL step](compare_acc.png)", "",
              "Rebuilt from the run directories by `python -m sod_jax.demo compare table --out "
              f"{out}`.", ""]
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
    """Write ``compare.md``, ``compare.json`` and ``compare_acc.png`` into ``out``; their paths."""
    out = Path(out)
    md, doc = build_report(out)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps(_json_safe(doc), indent=1))
    curves = {arm: list(rs.values()) for arm, rs in doc["runs"].items()}
    png = plot(curves, out / "compare_acc.png")
    return {"md": out / "compare.md", "json": out / "compare.json", "png": png}


# ---------------------------------------------------------------------------------------------
# The CLI (python -m sod_jax.demo compare {plan,run,table})
# ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_plan(args: Any) -> int:
    try:
        rule = make_rule(Path(args.pilot_dir), args.min_effect, config=args.config,
                         overrides=args.overrides or None, heldout=args.heldout, eval_n=args.eval_n,
                         seeds=_ints(args.seeds) if args.seeds else None, first_seed=args.first_seed,
                         at_least=args.at_least, at_most=args.at_most, bootstrap_reps=args.bootstrap_reps)
        path = write_rule(Path(args.out), rule, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rule_markdown(rule))
    print(f"rule: {path} (and {Path(args.out) / RULE_MD}); next: python -m sod_jax.demo compare run --rule {path} "
          f"--out {args.out}")
    return 0


def cmd_run(args: Any) -> int:
    out = Path(args.out)
    if args.rule:
        rule = json.loads(Path(args.rule).read_text())
        if args.seeds or args.config or args.eval_n is not None or args.heldout:
            print("error: with --rule the rule fixes the seeds, config, held-out set and eval.n; drop --seeds / "
                  "--config / --eval-n / --heldout", file=sys.stderr)
            return 2
        rule_file = out / RULE_JSON
        if not rule_file.is_file():
            out.mkdir(parents=True, exist_ok=True)
            rule_file.write_text(Path(args.rule).read_text())
            if Path(args.rule).with_name(RULE_MD).is_file():
                (out / RULE_MD).write_text(Path(args.rule).with_name(RULE_MD).read_text())
        elif json.loads(rule_file.read_text()) != rule:
            print(f"error: {rule_file} differs from {args.rule}: one --out holds one rule", file=sys.stderr)
            return 2
        if args.overrides:
            print(f"warning: overrides beyond the rule's ({' '.join(args.overrides)}) change the pre-registered "
                  "runs; each run's compare_run.json records them", file=sys.stderr)
        seeds, coef = list(rule["seeds"]), rule["opd_control_coef"]
        settings = {"config": rule["config"], "overrides": [*rule["overrides"], *args.overrides],
                    "heldout": rule["heldout"], "eval_n": rule["eval_n"]}
        arms = [a.strip() for a in (args.arms or ",".join(ARMS)).split(",") if a.strip()]
    else:
        if not args.seeds:
            print("error: give --rule RULE.json (the main runs) or --seeds (a pilot without a rule)", file=sys.stderr)
            return 2
        seeds, coef = _ints(args.seeds), None
        arms = [a.strip() for a in (args.arms or ",".join(PILOT_ARMS)).split(",") if a.strip()]
        if "opd_control" in arms:
            print("error: the opd_control arm needs the rule's coefficient: run compare plan first, then --rule",
                  file=sys.stderr)
            return 2
        settings = {"config": args.config or DEFAULT_CONFIG, "overrides": list(args.overrides),
                    "heldout": args.heldout or DEFAULT_HELDOUT, "eval_n": 4 if args.eval_n is None else args.eval_n}
    bad = [a for a in arms if a not in ARMS]
    if bad:
        print(f"error: unknown arm(s) {', '.join(bad)}; known: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    rc = run_arms(out, arms, seeds, control_coef=coef, **settings)
    if rc == 0:
        paths = write_report(out)
        print(f"table: {paths['md']}; plot: {paths['png']}")
    return rc


def cmd_table(args: Any) -> int:
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a directory", file=sys.stderr)
        return 2
    paths = write_report(out)
    print(paths["md"].read_text())
    print(f"table: {paths['md']}; data: {paths['json']}; plot: {paths['png']}")
    return 0


def run_compare(args: Any) -> int:
    """``python -m sod_jax.demo compare {plan,run,table}`` (the parser is in ``sod_jax.demo.__main__``)."""
    return {"plan": cmd_plan, "run": cmd_run, "table": cmd_table}[args.action](args)
