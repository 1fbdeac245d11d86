"""The comparison's runs (:mod:`sod_jax.demo.compare`): reading one run directory (training figures,
the final held-out evaluation and recovery after an error) and training, exporting and evaluating
every arm x seed, resumably."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sod_jax.demo.task import failed_steps, parse_problem
from sod_jax.tracking import read_jsonl

ARMS = ("grpo", "opd", "sod", "opd_control")
PILOT_ARMS = ("sod", "opd", "grpo")
DEFAULT_CONFIG = "configs/demo.yaml"  # demo_check: SOD RL from the shipped demo_check pair
DEFAULT_HELDOUT = "sod_jax/demo/assets/check/data/heldout.parquet"  # demo_check: 512 prompts
EXPORT_DIR, EVAL_DIR = "model", "final_eval"
EXPORT_MARK, RUN_RECORD = "model_export.json", "compare_run.json"
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the checkout holding sod_jax/ and configs/


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
    the mean ``d_1`` (``d1_mean``) over the ``step_weights.jsonl`` samples; over training,
    ``d1_curve`` (``(step, d_1)``: the batch mean of ``metrics.jsonl``'s ``step_d_mean_by_k[0]``)
    and ``w_ok_curve`` (``(step, mean w_k at correct tool steps)`` of that step's samples)."""
    run_dir = Path(run_dir)
    evals = read_jsonl(run_dir / "eval.jsonl")
    curve = [(int(r["step"]), eval_acc(r)) for r in evals if eval_acc(r) is not None]
    kl = [r["heldout_kl"] for r in evals if isinstance(r.get("heldout_kl"), (int, float))]
    at_fail, at_ok, after_fail, d1 = [], [], [], []
    w_ok_curve = []  # (step, mean w_k at correct tool steps of that step's samples)
    for rec in read_jsonl(run_dir / "step_weights.jsonl"):
        n_ok = len(at_ok)
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
        if len(at_ok) > n_ok and isinstance(rec.get("step"), int):
            w_ok_curve.append((rec["step"], float(np.mean(at_ok[n_ok:]))))
    # d_1 of the whole batch per RL step (metrics.jsonl; the samples above are 8 trajectories a step)
    d1_curve = [(int(m["step"]), float(m["step_d_mean_by_k"][0])) for m in read_jsonl(run_dir / "metrics.jsonl")
                if isinstance(m.get("step_d_mean_by_k"), list) and m["step_d_mean_by_k"]
                and isinstance(m.get("step"), int)]
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
        "d1_curve": d1_curve,
        "w_ok_curve": w_ok_curve,
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


def seed_dirs(arm_dir: Path) -> list[int]:
    if not arm_dir.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in arm_dir.iterdir() if p.is_dir() and re.fullmatch(r"seed\d+", p.name))


def run_config(run_dir: Path) -> Optional[dict]:
    import yaml

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return None
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        return None


def _total_steps(run_dir: Path) -> Optional[int]:
    cfg = run_config(run_dir)
    try:
        return int(cfg["train"]["total_steps"])
    except (TypeError, KeyError, ValueError):
        return None


def _checkpoint_dir(run_dir: Path) -> Path:
    cfg = run_config(run_dir) or {}
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
    """The ``algo.*`` overrides of an arm (the arms of :mod:`sod_jax.demo.compare`)."""
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
