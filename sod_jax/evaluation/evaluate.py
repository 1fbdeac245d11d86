"""Evaluation of a tool-using policy: ``eval.n`` samples per prompt through the agent loop, scored
by the reward pool, summarised as avg@k / unbiased pass@k / maj@k, the reference's bootstrap
figures and tool statistics per ``data_source``.

:func:`evaluate` is the library entry point. Its callers get everything it runs with from
:func:`sod_jax.evaluation.runtime.build_eval_runtime`: the RL loop on its live engine (the current
weights, no reload), the SFT accuracy hook on the trainer's weights and ``python -m sod_jax.eval``
on a loaded checkpoint.

Sampling is reproducible and independent of scheduling: the agent request of a prompt gets the seed
``crc32(f"{seed}:eval:{prompt_id}")`` and the engine derives each sample's key from that seed and
the sample index, so a prompt's samples do not depend on which prompts run with it, or in which
order.

With ``out_dir``, prompts are generated in chunks (``eval.chunk_prompts``) and every finished chunk
is appended to ``generations.jsonl`` before the next one starts; a rerun with the same directory
reads it back, regenerates only the prompts that have fewer than ``n`` recorded samples, and writes
a summary computed from all records (equal to an uninterrupted run's). ``eval_settings.json`` pins
what the records were made with; a rerun with other settings stops with an error instead of mixing
them.

Output files: ``generations.jsonl`` (one line per sample), ``summary.json`` (per source, all
prompts together, and verl's flat names) and ``summary.md`` (a table). ``out_dir`` may be a URL
(:mod:`sod_jax.paths`); there each chunk's append rewrites ``generations.jsonl`` whole (object
stores have no append), so a large evaluation is cheaper with a local ``out_dir``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import zlib
from collections import Counter, defaultdict
from typing import Any, Optional, Sequence

import jax

from sod_jax import parallel, paths
from sod_jax.algo.advantages import overlong_penalty  # the one DAPO overlong penalty (also re-exported here)
from sod_jax.evaluation import metrics as M
from sod_jax.rewards import response_text
from sod_jax.rollout.agent import Agent, AgentRequest, EnginePolicy, tool_error_rate
from sod_jax.rollout.sampling import SamplingParams
from sod_jax.tracking import append_jsonl, read_jsonl, write_jsonl

SETTINGS_KEYS = ("n", "temperature", "top_p", "max_response_length", "max_assistant_turns", "seed")


class EvalError(ValueError):
    """An evaluation that cannot run (or resume) as asked; the message says what to change."""


def request_seed(seed: int, prompt_id: Any) -> int:
    """Sampling seed of one prompt's request (samples then differ by their index in the request)."""
    return zlib.crc32(f"{seed}:eval:{prompt_id}".encode()) & 0x7FFFFFFF


def prompt_fingerprint(row: dict) -> str:
    """A short hash of what was asked (source, messages, ground truth): resuming checks it."""
    blob = json.dumps([row.get("data_source"), row.get("prompt"), row.get("ground_truth")], sort_keys=True,
                      default=str)
    return f"{zlib.crc32(blob.encode()):08x}"


# ---------------------------------------------------------------------------------------------
# Summary (pure functions of the per-sample records)
# ---------------------------------------------------------------------------------------------


def _group(records: Sequence[dict]) -> dict[str, dict[Any, list[dict]]]:
    """source -> prompt_id -> records sorted by sample index."""
    out: dict[str, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["data_source"]][r["prompt_id"]].append(r)
    for prompts in out.values():
        for recs in prompts.values():
            recs.sort(key=lambda r: r["sample"])
    return out


def source_summary(prompts: dict[Any, list[dict]], ks: Sequence[int]) -> dict[str, float]:
    """Figures of one data_source from its prompts' sample records (every prompt has the same n)."""
    groups = [prompts[p] for p in sorted(prompts, key=str)]
    n = min(len(g) for g in groups)
    correct = [[bool(r["acc"]) for r in g[:n]] for g in groups]
    preds = [[r.get("pred") or "" for r in g[:n]] for g in groups]
    flat = [r for g in groups for r in g[:n]]
    out: dict[str, float] = {"prompts": len(groups), "n": n, "samples": len(flat), "acc": M.avg_at_k(correct, n)}
    for k in sorted(set(k for k in ks if k <= n)):
        out[f"avg@{k}"] = M.avg_at_k(correct, k)
        out[f"pass@{k}"] = float(sum(M.pass_at_k(n, sum(c), k) for c in correct) / len(correct))
        out[f"maj@{k}"] = M.maj_at_k(preds, correct, k)
    # the reference's bootstrap figures of acc (verl's metric names: mean@n, best@k/mean, maj@k/mean, ...)
    boot = M.bootstrap_metrics(["_"] * len(flat), [r["prompt_id"] for r in flat],
                               {"acc": [float(bool(r["acc"])) for r in flat]}, [r.get("pred") or "" for r in flat])
    out.update(next(iter(boot.values()))["acc"])
    out["score_mean"] = _mean(r["score"] for r in flat)
    out["reward_mean"] = _mean(r["reward"] for r in flat)
    calls = sum(r["tool_calls"] for r in flat)
    errors = sum(r["tool_errors"] for r in flat)
    out["tool_calls_mean"] = calls / len(flat)
    out["tool_errors_mean"] = errors / len(flat)
    # records written before tool_invalid_calls existed count no call as invalid
    out["tool_error_rate"] = tool_error_rate(errors, calls, sum(r.get("tool_invalid_calls", 0) for r in flat))
    out["turns_mean"] = _mean(r["turns"] for r in flat)
    out["response_tokens_mean"] = _mean(r["response_tokens"] for r in flat)
    out["model_tokens_mean"] = _mean(r["model_tokens"] for r in flat)
    for reason, c in sorted(Counter(r["finish_reason"] for r in flat).items()):
        out[f"finish/{reason}"] = c / len(flat)
    out["reward_errors"] = sum(1 for r in flat if r.get("reward_error"))
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarize(records: Sequence[dict], ks: Sequence[int]) -> dict:
    """``{"per_source": {src: figures}, "all": figures over every prompt, "verl": flat verl names}``."""
    grouped = _group(records)
    per_source = {src: source_summary(prompts, ks) for src, prompts in sorted(grouped.items())}
    everything = {(src, p): recs for src, prompts in grouped.items() for p, recs in prompts.items()}
    flat = [r for recs in everything.values() for r in recs]
    nested = M.bootstrap_metrics([r["data_source"] for r in flat], [r["prompt_id"] for r in flat],
                                 {"acc": [float(bool(r["acc"])) for r in flat],
                                  "reward": [float(r["reward"]) for r in flat]},
                                 [r.get("pred") or "" for r in flat])
    return {"per_source": per_source, "all": source_summary(everything, ks) if len(per_source) > 1 else None,
            "verl": M.validation_metrics(nested)}


def summary_markdown(summary: dict, ks: Sequence[int], step: Optional[int] = None) -> str:
    """The summary as a markdown table, one row per data_source (and one for all of them)."""
    rows = dict(summary["per_source"])
    if summary.get("all"):
        rows["all"] = summary["all"]
    if not rows:
        return "no samples\n"
    n = max(int(r["n"]) for r in rows.values())
    k_cols = [k for k in sorted(set(ks)) if k <= n]
    head = (["source", "prompts", f"avg@{n}"] + [f"pass@{k}" for k in k_cols] + [f"maj@{k}" for k in k_cols]
            + [f"best@{n}/mean", f"maj@{n}/mean", "tool calls", "tool err/call", "turns", "resp tokens", "finish"])
    lines = []
    if step is not None:
        lines.append(f"Evaluation at step {step}.\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for src, d in rows.items():
        finish = ", ".join(f"{k.split('/', 1)[1]} {v:.0%}" for k, v in d.items() if k.startswith("finish/"))
        cells = [src, str(int(d["prompts"])), f"{100 * d['acc']:.1f}"]
        cells += [f"{100 * d[f'pass@{k}']:.1f}" if f"pass@{k}" in d else "" for k in k_cols]
        cells += [f"{100 * d[f'maj@{k}']:.1f}" if f"maj@{k}" in d else "" for k in k_cols]
        nn = int(d["n"])
        cells += [f"{100 * d.get(f'best@{nn}/mean', float('nan')):.1f}", f"{100 * d.get(f'maj@{nn}/mean', float('nan')):.1f}",
                  f"{d['tool_calls_mean']:.2f}", f"{d['tool_error_rate']:.2f}", f"{d['turns_mean']:.2f}",
                  f"{d['response_tokens_mean']:.0f}", finish]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Figures in %. avg@{n} = mean over prompts of the fraction of the {n} samples that are correct "
                 f"(the paper's avg@{n}); pass@k = unbiased 1 - C(n-c, k)/C(n, k); maj@k = majority vote over the "
                 f"extracted answers of the first k samples. best@{n}/mean and maj@{n}/mean are the reference's "
                 f"bootstrap figures (its \"pass@{n}\" is best@{n}/mean). tool err/call = malformed calls and failed "
                 "runs per executed call; resp tokens = assistant + tool tokens per sample.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Resumable records
# ---------------------------------------------------------------------------------------------


def _check_settings(out_dir: paths.AnyPath, settings: dict) -> None:
    path = out_dir / "eval_settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), settings[k]) for k in settings if old.get(k) != settings[k]}
        if diff:
            what = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            raise EvalError(f"{out_dir} holds generations made with other settings ({what}); use a new output "
                            "directory or the same settings to resume")
    else:
        path.write_text(json.dumps(settings, indent=2))


class _CountingPolicy:
    """Delegates to a TurnPolicy; counts finished trajectories (one ``release`` each) for the progress bar."""

    def __init__(self, inner: Any, on_done):
        self._inner, self._on_done = inner, on_done

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def release(self, handle):
        self._inner.release(handle)
        self._on_done()


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def evaluate(engine: Any, tokenizer: Any, sandbox: Any, rows: Sequence[dict], *, eval_cfg: Any, agent_cfg: Any,
             reward_pool: Any, step: Optional[int] = None, out_dir: Optional[str] = None, seed: int = 0,
             progress: bool = True, loop: Optional[asyncio.AbstractEventLoop] = None,
             tools: Optional[list[dict]] = None) -> dict:
    """Run, score and summarise ``eval_cfg.n`` tool-using samples of every row.

    ``engine``: a :class:`sod_jax.rollout.Engine` (sampled with ``eval_cfg.temperature`` /
    ``top_p``) or any :class:`~sod_jax.rollout.agent.TurnPolicy` (used as is). ``rows``: normalised
    eval rows (``data_source``, ``prompt`` = the final messages, ``ground_truth``, ``extra_info``,
    ``index``). ``agent_cfg``: :class:`~sod_jax.rollout.agent.AgentConfig`; its response budget is
    replaced by ``eval_cfg.max_response_length``. ``reward_pool``: a
    :class:`~sod_jax.rewards.RewardPool`. ``loop``: the event loop the sandbox belongs to (default: a
    fresh one). ``tools``: the tool schemas shown to the model (default: the agent's).

    Returns ``{data_source: figures}`` with, per source, ``acc`` (= avg@n), ``avg@k``, ``pass@k``,
    ``maj@k`` for ``eval_cfg.ks``, the bootstrap figures of ``acc`` under verl's names (``mean@n``,
    ``best@k/mean``, ``maj@k/mean``, ...), ``score_mean``, ``reward_mean`` (with the overlong
    penalty), ``tool_calls_mean``, ``tool_errors_mean``, ``tool_error_rate``, ``turns_mean``,
    ``response_tokens_mean``, ``model_tokens_mean``, ``finish/<reason>`` fractions, ``prompts``, ``n``.
    """

    n = int(eval_cfg.n)
    if n < 1:
        raise EvalError(f"eval.n must be >= 1, got {n}")
    bad_k = [k for k in eval_cfg.ks if k < 1 or k > n]
    if bad_k:
        raise EvalError(f"eval.ks {bad_k} are outside [1, eval.n={n}]")
    agent_cfg = dataclasses.replace(agent_cfg, max_response_tokens=int(eval_cfg.max_response_length))
    if hasattr(engine, "advance"):
        policy = engine
    else:
        if float(eval_cfg.temperature) <= 0:  # temperature 0: greedy decoding (argmax)
            sampling = SamplingParams(greedy=True)
        else:
            sampling = SamplingParams(temperature=eval_cfg.temperature, top_p=eval_cfg.top_p)
        policy = EnginePolicy(engine, sampling)
    if n > policy.capacity:
        raise EvalError(f"eval.n={n} samples per prompt but the engine has {policy.capacity} decode slots; raise "
                        "rollout.num_slots to at least eval.n (or lower eval.n)")
    agent = Agent(tokenizer, sandbox, agent_cfg)
    if tools is not None:
        agent.tools = list(tools)

    ids = [r.get("index", i) for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):  # rows of several loads: their positions identify them
        ids = list(range(len(rows)))
    fingerprints = [prompt_fingerprint(r) for r in rows]
    out = paths.makedirs(out_dir) if out_dir is not None else None  # a local path or a URL
    records: list[dict] = []
    if out is not None:
        settings = {"n": n, "temperature": float(eval_cfg.temperature), "top_p": float(eval_cfg.top_p),
                    "max_response_length": int(eval_cfg.max_response_length),
                    "max_assistant_turns": int(agent_cfg.max_assistant_turns), "seed": int(seed)}
        _check_settings(out, settings)
        known = dict(zip(ids, fingerprints))
        by_prompt: dict[Any, dict[int, dict]] = defaultdict(dict)
        for rec in read_jsonl(out / "generations.jsonl"):
            pid = rec.get("prompt_id")
            if pid in known and rec.get("fingerprint") != known[pid]:
                raise EvalError(f"{out}/generations.jsonl: prompt {pid} was a different prompt (fingerprint "
                                f"{rec.get('fingerprint')} vs {known[pid]}); use a new output directory")
            if pid in known:
                by_prompt[pid][int(rec["sample"])] = rec
        done = {pid for pid, recs in by_prompt.items() if len(recs) >= n and all(j in recs for j in range(n))}
        records = [by_prompt[pid][j] for pid in ids if pid in done for j in range(n)]
        # rewrite the file without partial prompts, so it holds exactly the finished ones
        if jax.process_index() == 0:
            write_jsonl(out / "generations.jsonl", records)
        if done:
            print(f"eval: resuming in {out}: {len(done)} of {len(rows)} prompts already generated, "
                  f"{len(rows) - len(done)} to go", file=sys.stderr)
    else:
        done = set()
    todo = [i for i, pid in enumerate(ids) if pid not in done]
    # Several processes: each samples every P-th prompt still to do; each chunk's records are
    # gathered to every process (the same figures as one process) and written once, by process 0.
    P, me = jax.process_count(), jax.process_index()
    chunk = int(getattr(eval_cfg, "chunk_prompts", 0) or 0) or max(1, 4 * (policy.capacity // n))
    mine = todo[me::P]
    chunks = -(-max(len(todo[p::P]) for p in range(P)) // chunk) if todo else 0  # the same on every process
    bar = None
    if progress and mine and me == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine) * n, initial=0, unit="sample", desc="eval", dynamic_ncols=True)
    counted = _CountingPolicy(policy, (lambda: bar.update(1)) if bar is not None else (lambda: None))
    own_loop = loop is None
    if own_loop:
        loop = asyncio.new_event_loop()
    buffer_len = int(getattr(eval_cfg, "overlong_buffer_len", 0) or 0)
    factor = float(getattr(eval_cfg, "overlong_penalty_factor", 1.0))

    def finish_chunk(idx: list[int], trajs: list, scores: list[dict]) -> list[dict]:
        recs = []
        for t, s in zip(trajs, scores):
            i = idx[t.request_id]
            row = rows[i]
            ntok = len(t.response_ids)
            recs.append({
                "prompt_id": ids[i], "index": row.get("index", i), "data_source": row["data_source"],
                "fingerprint": fingerprints[i], "sample": t.sample_index, "response": t.text,
                "pred": s.get("pred", ""), "score": float(s.get("score", 0.0)), "acc": bool(s.get("acc", False)),
                "reward": float(s.get("score", 0.0)) + overlong_penalty(ntok, int(eval_cfg.max_response_length),
                                                                       buffer_len, factor),
                "reward_error": s.get("error"), "turns": t.num_turns, "tool_calls": t.num_tool_calls,
                "tool_errors": t.num_tool_errors, "tool_invalid_calls": t.num_invalid_calls,
                "finish_reason": t.finish_reason, "response_tokens": ntok,
                "model_tokens": int(sum(t.response_mask)),
            })
        if P > 1:
            order = {pid: k for k, pid in enumerate(ids)}
            recs = sorted((r for part in parallel.all_gather_json(recs) for r in part),
                          key=lambda r: (order[r["prompt_id"]], r["sample"]))
        if out is not None and me == 0:
            append_jsonl(out / "generations.jsonl", recs, sync=True)
        return recs

    pending = None  # (indices, trajectories, future of their scores): scored while the next chunk generates
    try:
        for c in range(chunks):
            idx = mine[c * chunk:(c + 1) * chunk]  # may be empty on some process in the last chunks
            reqs = [AgentRequest(rows[i]["prompt"], n=n, seed=request_seed(seed, ids[i]), id=j)
                    for j, i in enumerate(idx)]
            trajs = loop.run_until_complete(agent.run(counted, reqs))
            items = [{"data_source": rows[idx[t.request_id]]["data_source"],
                      "solution": response_text(tokenizer, t.response_ids),
                      "ground_truth": rows[idx[t.request_id]]["ground_truth"],
                      "extra_info": rows[idx[t.request_id]].get("extra_info") or {}} for t in trajs]
            fut = reward_pool.submit(items)
            if pending is not None:
                records += finish_chunk(pending[0], pending[1], pending[2].result())
            pending = (idx, trajs, fut)
        if pending is not None:
            records += finish_chunk(pending[0], pending[1], pending[2].result())
    finally:
        if bar is not None:
            bar.close()
        if own_loop:
            loop.close()

    ks = list(eval_cfg.ks)
    summary = summarize(records, ks)
    if out is not None and me == 0:
        doc = {"step": step, "n": n, "ks": ks, "seed": seed, **summary}
        (out / "summary.json").write_text(json.dumps(doc, indent=2, default=_nan_safe))
        (out / "summary.md").write_text(summary_markdown(summary, ks, step))
    return dict(summary["per_source"])


def _nan_safe(x):
    return None if isinstance(x, float) and math.isnan(x) else str(x)
