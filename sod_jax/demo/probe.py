"""The mechanism probe (``python -m sod_jax.demo probe``): is SOD's premise true of a teacher/student
pair on the demo_check task, before any RL?

For held-out problems, a trajectory is built the way the student's own errors look: the steps
before step k right, step k's first attempt with one miscopied digit (the sandbox's real
``AssertionError`` traceback after it), then the *redo* of step k, the remaining steps and the
answer (:func:`sod_jax.demo.check_task.plan_attempts`, run in the local sandbox). Teacher-forced over
it, with ``s_t`` / ``q_t`` the student's / teacher's log-prob of token t:

* **P(redo)**: each model's probability of the redo decision after the failed check (the tokens
  ``<think>\\ncheck failed, redo\\n`` opening the redo turn), and its mean log-prob per token of
  the whole redo turn;
* **OPD's push on the redo**: the mean of ``q_t - s_t`` over the redo turn's tokens (the
  distillation advantage OPD adds there; negative means OPD lowers the student's redo);
* **d_k, w_k** (:func:`sod_jax.algo.sod.step_stats`, the loss's own code) at the error step, the
  redo and the steps done right the first time (d_1 included among those), those also split into
  the steps before the error (a clean context for the teacher) and after the redo (the traceback
  still in its context);
* **the first-order effect of OPD's post-error term on log pi(redo)**: with
  ``L_post(theta) = sum_{turns j >= redo} c_j sum_{t in j} sg(q_t - s_t) log pi_theta(t)`` (the
  distillation term of the turns from the redo on; ``c_j = 1`` for OPD, ``c_j = w_j`` for SOD) and
  ``R(theta) = sum_{t in redo} log pi_theta(t)``: ``<grad L_post, grad R>`` (the change of
  ``log pi(redo)`` per unit learning rate of a gradient step on that term alone) and the cosine
  between the two gradients (:func:`gradient_effect`, checked against finite differences in
  ``tests/demo/test_probe.py``).

The same problems without an error (every step right the first time, :func:`measure_clean`) give
the weights SOD puts on correct work when nothing went wrong: ``d_1`` and the mean ``d_k`` / ``w_k``
of the later tool steps. A turn 1 that is easier for the student than the later ones makes ``d_1``
small and every later ``w_k`` with it.

SOD's premise holds when the teacher's P(redo) is far below the student's, OPD's push on the redo is
negative, SOD's w is small at the redo, SOD's weighting makes the post-error term's effect on
log pi(redo) less negative than OPD's, and the error-free trajectories' later steps keep most of
their weight.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sod_jax.algo.sod import step_stats
from sod_jax.demo import check_task
from sod_jax.demo.check_task import Attempt, Problem
from sod_jax.rl.update import sequence_logprobs
from sod_jax.sft.packing import tokenize_conversation

DECISION = "<think>\ncheck failed, redo\n"


@dataclass
class ProbeTrajectory:
    """One constructed error-and-redo trajectory, tokenized."""

    problem: Problem
    attempts: list[Attempt]
    outputs: list[str]
    ids: np.ndarray  # [T] int32
    mask: np.ndarray  # [T] 1 on assistant tokens (the loss mask: token t predicted from t-1)
    error_turn: int  # 0-based assistant turn of the failed attempt (the redo is error_turn + 1); -1: none
    decision_len: int  # tokens of DECISION at the start of the redo turn (0 without an error)


def turn_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of ones of ``mask`` ``[T]`` (one per assistant turn)."""
    m = np.concatenate([[0], np.asarray(mask, np.int8), [0]])
    starts = np.flatnonzero((m[1:] == 1) & (m[:-1] == 0))
    ends = np.flatnonzero((m[1:] == 0) & (m[:-1] == 1))
    return list(zip(starts.tolist(), ends.tolist()))


def build_trajectories(problems: Sequence[Problem], tokenizer: Any, seed: int = 0, sandbox_factory: Any = None,
                       max_output_chars: int = 256, recover: bool = True) -> list[ProbeTrajectory]:
    """One error-and-redo trajectory per problem (the error step drawn by ``seed``; ``recover=False``:
    every step right the first time), with real sandbox outputs, tokenized with ``tokenizer``'s chat
    template."""
    rng = random.Random(seed)
    plans = [(p, check_task.plan_attempts(p, rng, recover=recover)) for p in problems]
    if sandbox_factory is None:
        from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

        def sandbox_factory():
            return LocalSandbox(LocalSandboxConfig(workers=2))

    async def run():
        sb = sandbox_factory()
        try:
            return await check_task.run_attempts(plans, sb, max_output_chars=max_output_chars)
        finally:
            await sb.close()

    outputs = asyncio.run(run())
    decision = tokenizer.encode(DECISION)
    out = []
    for (p, attempts), outs in zip(plans, outputs):
        # every assistant turn is a step here (as in an RL rollout), the miscopied one included
        msgs = [{k: v for k, v in m.items() if k != "weight"} for m in check_task.expert_messages(p, attempts, outs)]
        ex = tokenize_conversation(tokenizer, msgs, [check_task.CODE_INTERPRETER_TOOL])
        error_turn = next((i for i, a in enumerate(attempts) if not a.passes()), -1)
        spans = turn_spans(ex.loss_mask)
        if len(spans) != len(attempts) + 1:
            raise ValueError(f"{len(spans)} assistant spans for {len(attempts) + 1} assistant turns")
        if error_turn >= 0:
            start = spans[error_turn + 1][0]
            if list(ex.ids[start:start + len(decision)]) != list(decision):
                raise ValueError("the redo turn does not start with the decision tokens as tokenized alone")
        out.append(ProbeTrajectory(p, attempts, outs, np.asarray(ex.ids, np.int32), np.asarray(ex.loss_mask, np.int8),
                                   error_turn, len(decision) if error_turn >= 0 else 0))
    return out


def _pad(trajs: Sequence[ProbeTrajectory], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B = len(trajs)
    ids = np.zeros((B, length), np.int32)
    mask = np.zeros((B, length), np.int8)
    attn = np.zeros((B, length), np.int32)
    for i, t in enumerate(trajs):
        n = len(t.ids)
        ids[i, :n], mask[i, :n], attn[i, :n] = t.ids, t.mask, 1
    return ids, mask, attn


def _logp_fn(graphdef: Any, chunk: int):
    @jax.jit
    def logp(params, ids, attn):  # [B, T] log p(ids[t] | ids[<t]) (0 at t = 0)
        return sequence_logprobs(graphdef, params, ids, None, attn, chunk)[0]

    return logp


def gradient_effect(graphdef: Any, params: Any, ids: jax.Array, attn: jax.Array, adv: jax.Array, redo: jax.Array,
                    chunk: int = 256) -> dict:
    """For one row (``[1, T]`` inputs): ``g = grad sum_t adv_t log pi(t)`` (``adv`` held fixed: the
    distillation term's gradient) and ``r = grad sum_t redo_t log pi(t)``; returns ``inner = <g, r>``
    (the first-order change of ``log pi(redo)`` per unit step along ``g``), ``cos`` and both norms."""

    def objective(p, weights):
        return jnp.sum(weights * sequence_logprobs(graphdef, p, ids, None, attn, chunk)[0])

    g = jax.grad(objective)(params, adv)
    r = jax.grad(objective)(params, redo)
    leaves = lambda t: [x.astype(jnp.float32).ravel() for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    gv, rv = jnp.concatenate(leaves(g)), jnp.concatenate(leaves(r))
    inner = jnp.dot(gv, rv)
    gn, rn = jnp.linalg.norm(gv), jnp.linalg.norm(rv)
    return {"inner": inner, "cos": inner / jnp.maximum(gn * rn, 1e-30), "norm_term": gn, "norm_redo": rn}


def _step_figures(student: Any, teacher: Any, trajs: Sequence[ProbeTrajectory], eps: float, delta: float,
                  chunk: int) -> tuple:
    """Teacher-forced over ``trajs``: padded ``ids`` / ``mask`` / ``attn`` ``[B, T]``, the student's and
    the teacher's log-probs ``s`` / ``q`` ``[B, T]`` and the loss's own step statistics."""
    T = max(len(t.ids) for t in trajs)
    ids, mask, attn = _pad(trajs, T)
    s_graph, s_params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    s = np.asarray(_logp_fn(s_graph, chunk)(s_params, ids, attn))  # [B, T]
    q = np.asarray(_logp_fn(t_graph, chunk)(t_params, ids, attn))
    return ids, mask, attn, s, q, step_stats(jnp.asarray(s), jnp.asarray(q), jnp.asarray(mask), eps, delta)


def measure_clean(student: Any, teacher: Any, trajs: Sequence[ProbeTrajectory], *, eps: float = 1e-6,
                  delta: float = 0.2, chunk: int = 256) -> dict:
    """Over error-free trajectories: mean ``d_1`` (``clean_d_first``) and the mean ``d_k`` / ``w_k`` of
    the tool steps k >= 2 (``clean_d_later`` / ``clean_w_later``; the answer turn left out)."""
    _, _, _, _, _, st = _step_figures(student, teacher, trajs, eps, delta, chunk)
    d, w = np.asarray(st.divergence), np.asarray(st.step_weight)  # [B, S], step k in column k
    later = [(b, k + 1) for b, t in enumerate(trajs) for k in range(1, len(t.attempts))]
    return {"clean_d_first": float(d[:, 1].mean()),
            "clean_d_later": float(np.mean([d[b, c] for b, c in later])) if later else None,
            "clean_w_later": float(np.mean([w[b, c] for b, c in later])) if later else None,
            "clean_trajectories": len(trajs)}


def measure(student: Any, teacher: Any, trajs: Sequence[ProbeTrajectory], *, eps: float = 1e-6, delta: float = 0.2,
            chunk: int = 256, gradients: bool = True) -> dict:
    """The probe's figures over ``trajs`` (means over trajectories unless a name says tokens)."""
    ids, mask, attn, s, q, st = _step_figures(student, teacher, trajs, eps, delta, chunk)
    T = ids.shape[1]
    s_graph, s_params = nnx.split(student)
    d, w = np.asarray(st.divergence), np.asarray(st.step_weight)  # [B, S], step k in column k
    rows: dict[str, list] = {k: [] for k in ("p_redo_teacher", "p_redo_student", "lp_redo_teacher", "lp_redo_student",
                                             "d_error", "w_error", "d_redo", "w_redo", "d_first", "w_correct",
                                             "d_correct", "d_before", "w_before", "d_after", "w_after")}
    gaps: list[np.ndarray] = []
    grad_rows: dict[str, list] = {k: [] for k in ("opd_inner", "opd_cos", "sod_inner", "sod_cos")}
    grad_fn = jax.jit(lambda p, i, a, adv, r: gradient_effect(s_graph, p, i, a, adv, r, chunk)) if gradients else None
    for b, t in enumerate(trajs):
        spans = turn_spans(mask[b])
        e = t.error_turn
        r0, r1 = spans[e + 1]
        dec = slice(r0, r0 + t.decision_len)
        rows["p_redo_teacher"].append(float(np.exp(np.float64(q[b, dec].sum()))))
        rows["p_redo_student"].append(float(np.exp(np.float64(s[b, dec].sum()))))
        rows["lp_redo_teacher"].append(float(q[b, r0:r1].mean()))
        rows["lp_redo_student"].append(float(s[b, r0:r1].mean()))
        gaps.append(q[b, r0:r1] - s[b, r0:r1])
        # steps are 1-based columns: turn j is step j + 1
        rows["d_error"].append(float(d[b, e + 1]))
        rows["w_error"].append(float(w[b, e + 1]))
        rows["d_redo"].append(float(d[b, e + 2]))
        rows["w_redo"].append(float(w[b, e + 2]))
        rows["d_first"].append(float(d[b, 1]))
        correct = [j for j in range(len(t.attempts)) if j not in (e, e + 1)]
        rows["d_correct"] += [float(d[b, j + 1]) for j in correct]
        rows["w_correct"] += [float(w[b, j + 1]) for j in correct if j > 0]  # w_1 = 1 by definition
        # the same steps split: done right before the error (the teacher reads a clean context), and
        # after the redo (the traceback is still in its context)
        rows["d_before"] += [float(d[b, j + 1]) for j in correct if j < e]
        rows["w_before"] += [float(w[b, j + 1]) for j in correct if 0 < j < e]
        rows["d_after"] += [float(d[b, j + 1]) for j in correct if j > e]
        rows["w_after"] += [float(w[b, j + 1]) for j in correct if j > e]
        if gradients:
            redo = np.zeros((1, T), np.float32)
            redo[0, r0:r1] = 1.0
            post = np.zeros((1, T), np.float32)
            post[0, r0:] = mask[b, r0:]  # the turns from the redo on
            gap = (q[b] - s[b])[None] * post
            tok_w = np.asarray(st.weights)[b][None]
            for name, adv in (("opd", gap), ("sod", gap * tok_w)):
                res = grad_fn(s_params, ids[b:b + 1], attn[b:b + 1], jnp.asarray(adv), jnp.asarray(redo))
                grad_rows[f"{name}_inner"].append(float(res["inner"]))
                grad_rows[f"{name}_cos"].append(float(res["cos"]))
    out = {k: float(np.mean(v)) if v else None for k, v in rows.items()}
    out["q_minus_s_redo_tokens"] = float(np.mean(np.concatenate(gaps)))
    out.update({k: float(np.mean(v)) if v else None for k, v in grad_rows.items()})
    out["trajectories"] = len(trajs)
    return out


def run_probe(student_dir: str, teacher_dir: str, heldout: str, n: int = 64, seed: int = 0,
              tokenizer_dir: Optional[str] = None, gradients: bool = True) -> dict:
    """The probe on the first ``n`` problems of the held-out parquet ``heldout`` (demo_check rows)."""
    import pyarrow.parquet as pq

    from sod_jax.chat import ChatTokenizer
    from sod_jax.models import load_pretrained

    rows = pq.read_table(heldout).to_pylist()
    problems = [check_task.parse_problem(r["prompt"][-1]["content"]) for r in rows]
    problems = [p for p in problems if p is not None][:n]
    if not problems:
        raise ValueError(f"{heldout}: no demo_check prompts")
    tok = ChatTokenizer.from_dir(tokenizer_dir or student_dir)
    trajs = build_trajectories(problems, tok, seed=seed)
    clean = build_trajectories(problems, tok, seed=seed, recover=False)
    student = load_pretrained(student_dir, dtype="float32")
    teacher = load_pretrained(teacher_dir, dtype="float32")
    res = measure(student, teacher, trajs, gradients=gradients)
    res.update(measure_clean(student, teacher, clean))
    res.update(student=str(student_dir), teacher=str(teacher_dir), heldout=str(heldout), seed=seed)
    return res


def format_probe(r: dict) -> str:
    """The probe's figures as the README prints them."""
    f = lambda x, spec=".3f": "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"probe over {r['trajectories']} constructed error-and-redo trajectories (held-out problems):",
        f"  P(redo decision after a failed check): teacher {f(r['p_redo_teacher'])}, student {f(r['p_redo_student'])}",
        f"  mean log-prob per redo token:           teacher {f(r['lp_redo_teacher'])}, student "
        f"{f(r['lp_redo_student'])}",
        f"  mean (q - s) on the redo tokens (OPD's push): {f(r['q_minus_s_redo_tokens'])}",
        f"  d_k / w_k: error step {f(r['d_error'])} / {f(r['w_error'])}; redo {f(r['d_redo'])} / {f(r['w_redo'])}; "
        f"correct steps {f(r['d_correct'])} / {f(r['w_correct'])} (w_1 = 1 left out); d_1 {f(r['d_first'])}",
        f"  correct steps split: before the error {f(r.get('d_before'))} / {f(r.get('w_before'))} (w_1 left out); "
        f"after the redo {f(r.get('d_after'))} / {f(r.get('w_after'))}",
    ]
    if r.get("clean_trajectories"):
        lines.append(f"  the same problems without an error: d_1 {f(r['clean_d_first'])}; tool steps k >= 2 d_k / w_k "
                     f"{f(r['clean_d_later'])} / {f(r['clean_w_later'])}")
    if r.get("opd_inner") is not None:
        lines.append(f"  post-error distillation term vs log pi(redo): OPD <g, r> {f(r['opd_inner'], '.4g')} "
                     f"(cos {f(r['opd_cos'])}); SOD weights <g, r> {f(r['sod_inner'], '.4g')} (cos {f(r['sod_cos'])})")
    return "\n".join(lines)


__all__ = ["ProbeTrajectory", "build_trajectories", "format_probe", "gradient_effect", "measure", "measure_clean",
           "run_probe", "turn_spans"]
