"""Train the demo's teacher and student: SFT on the expert trajectories, stopped by held-out accuracy.

The loss covers exactly the tokens of assistant messages (think text, tool-call text, the closing
``<|im_end|>``), never the system/user/tool tokens nor the ``<|im_start|>assistant\\n`` header.
Conversations are packed into rows of ``row_len`` tokens (segment ids, per-segment positions;
attention never crosses a segment), so one step shape compiles once.

Every ``eval_every`` steps the model runs the real tool-using agent (rollout engine, local
sandbox, greedy decoding) on held-out prompts and is scored by the exact checker. The run stops
when the held-out accuracy reaches ``stop_at_least`` (the teacher) or first lands inside
``[stop_band_low, stop_band_high]`` (the student: a checkpoint with headroom for RL); the
checkpoint of that evaluation is written in HF format with the tokenizer files (also on SIGTERM /
Ctrl-C, after the current step).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class ModelSize:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32


@dataclass
class SFTRun:
    out_dir: str = "runs/demo_teacher_sft"
    tokenizer_dir: str = ""
    sft_files: list = field(default_factory=list)
    heldout_files: list = field(default_factory=list)
    size: ModelSize = field(default_factory=ModelSize)
    seed: int = 0
    lr: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = 3000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    row_len: int = 512
    rows_per_step: int = 6
    eval_every: int = 100
    eval_prompts: int = 64
    eval_after_loss: float = 10.0  # evaluate only once the training loss is below this
    stop_at_least: Optional[float] = None
    stop_band: Optional[tuple] = None  # (low, high)
    max_turns: int = 4
    max_response_tokens: int = 256
    init_from: Optional[str] = None  # continue from this HF checkpoint (fresh optimizer) instead of random weights


# ---------------------------------------------------------------------------------------------
# Tokens and packing
# ---------------------------------------------------------------------------------------------


def assistant_mask(tok: Any, messages: list[dict], tools: Optional[list]) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation and a 0/1 mask that is 1 on assistant-message tokens
    (after each ``<|im_start|>assistant\\n`` header, up to and including its ``<|im_end|>``)."""
    text = tok.render(messages, tools)
    enc = tok.tok.encode(text, add_special_tokens=False)
    header, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans, pos = [], 0
    while True:
        i = text.find(header, pos)
        if i < 0:
            break
        j = text.find(end, i + len(header))
        if j < 0:
            raise ValueError("an assistant turn is not closed by <|im_end|>")
        spans.append((i + len(header), j + len(end)))
        pos = j
    mask = []
    for (a, b) in enc.offsets:
        mask.append(int(any(s <= a and b <= e for s, e in spans)))
    return list(enc.ids), mask


def pack(seqs: Sequence[tuple[list[int], list[int]]], row_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Greedy packing of (ids, mask) into rows ``[R, row_len]``: input ids, segment ids (0 = padding),
    per-segment positions and the loss mask of each *target* token (token t predicted from < t)."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ids, m in seqs:
        if len(ids) > row_len:
            raise ValueError(f"a conversation of {len(ids)} tokens exceeds row_len {row_len}")
        if used + len(ids) > row_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, m))
        used += len(ids)
    R = len(rows)
    out = {k: np.zeros((R, row_len), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask")}
    out["input_ids"][:] = pad_id
    for r, row in enumerate(rows):
        t = 0
        for s, (ids, m) in enumerate(row, start=1):
            n = len(ids)
            out["input_ids"][r, t:t + n] = ids
            out["segment_ids"][r, t:t + n] = s
            out["positions"][r, t:t + n] = np.arange(n)
            out["loss_mask"][r, t + 1:t + n] = m[1:]  # the first token of a segment has no context
            t += n
    return out


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def make_step(graphdef: Any, tx: Any, chunk: int = 512):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sod_jax.models.logprobs import token_logprobs

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        valid = batch["segment_ids"] > 0
        h = model.hidden_states(batch["input_ids"], positions=batch["positions"], attention_mask=valid,
                                segment_ids=batch["segment_ids"])
        lp = token_logprobs(h[:, :-1], model.lm_head_weight(), batch["input_ids"][:, 1:], chunk=chunk)  # [B, T-1]
        m = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)

    @partial_jit_donate
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return step


def partial_jit_donate(fn):
    import jax

    return jax.jit(fn, donate_argnums=(0, 1))


# ---------------------------------------------------------------------------------------------
# Held-out accuracy with real tool execution
# ---------------------------------------------------------------------------------------------


class HeldoutEval:
    """Greedy tool-using rollouts of a model on held-out rows, scored by the exact checker."""

    def __init__(self, model: Any, tok: Any, rows: list[dict], max_turns: int = 4, max_response_tokens: int = 256,
                 slots: int = 64):
        from sod_jax.rollout import Engine
        from sod_jax.rollout.agent import Agent, AgentConfig
        from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

        self.rows, self.tok = rows, tok
        self.sandbox = LocalSandbox(LocalSandboxConfig(workers=4))
        self.agent = Agent(tok, self.sandbox, AgentConfig(max_assistant_turns=max_turns,
                                                          max_response_tokens=max_response_tokens))
        longest = max(len(self.agent.prompt_ids(r["prompt"])) for r in rows)
        self.engine = Engine(model, num_slots=min(slots, len(rows)), max_len=longest + max_response_tokens + 8,
                             stop_ids=tok.stop_ids, prefill_buckets=(64, 128))

    def __call__(self, model_or_params: Any) -> dict:
        from sod_jax.demo.task import score
        from sod_jax.rollout import SamplingParams
        from sod_jax.rollout.agent import AgentRequest, EnginePolicy

        self.engine.update_params(model_or_params)
        reqs = [AgentRequest(r["prompt"], 1, i, i) for i, r in enumerate(self.rows)]
        trajs = asyncio.run(self.agent.run(EnginePolicy(self.engine, SamplingParams(greedy=True)), reqs))
        accs = [score(t.text, r["reward_model"]["ground_truth"])["acc"] for t, r in zip(trajs, self.rows)]
        return {"acc": float(np.mean(accs)), "tool_calls": float(np.mean([t.num_tool_calls for t in trajs])),
                "tool_errors": float(np.mean([t.num_tool_errors for t in trajs])),
                "turns": float(np.mean([t.num_turns for t in trajs]))}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _read_parquet(files: Sequence[str]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows


def _clean_messages(msgs: list[dict]) -> list[dict]:
    """Parquet gives every struct field to every message; drop the null ones."""
    return [{k: v for k, v in m.items() if v is not None} for m in msgs]


# The shipped models (sizes and stopping rules). The teacher: 3 layers, d=128; the student: 2 layers,
# d=96, stopped on its way up, inside the 10-30% band.
TEACHER = dict(size=ModelSize(128, 256, 3, 4, 2, 32), lr=3e-3, warmup_steps=50, max_steps=2500, rows_per_step=4,
               eval_every=50, eval_prompts=64, eval_after_loss=0.3, stop_at_least=0.9, seed=0)
STUDENT = dict(size=ModelSize(96, 256, 2, 4, 2, 24), lr=3e-3, warmup_steps=50, max_steps=3000, rows_per_step=4,
               eval_every=20, eval_prompts=64, eval_after_loss=0.35, stop_band=(0.1, 0.3), seed=1)


def train(run: SFTRun, progress: bool = True) -> dict:
    import jax
    import optax
    from flax import nnx
    from tqdm import tqdm

    from sod_jax.chat import ChatTokenizer
    from sod_jax.models import Qwen3Config, init_model, save_pretrained

    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(run), indent=2, default=list))
    tok = ChatTokenizer.from_dir(run.tokenizer_dir)
    rows = _read_parquet(run.sft_files)
    seqs = [assistant_mask(tok, _clean_messages(r["messages"]), r["tools"]) for r in rows]
    heldout = _read_parquet(run.heldout_files)[: run.eval_prompts]
    vocab = tok.vocab_size
    cfg = Qwen3Config(vocab_size=vocab, rope_theta=10000.0, max_position_embeddings=4096,
                      bos_token_id=tok.token_id("<|endoftext|>"), eos_token_id=tok.eos_id,
                      tie_word_embeddings=True, **asdict(run.size))
    if run.init_from:
        from sod_jax.models import load_pretrained

        model = load_pretrained(run.init_from, dtype="float32")
        cfg = model.config
    else:
        model = init_model(cfg, seed=run.seed)
    graphdef, params = nnx.split(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    sched = optax.warmup_cosine_decay_schedule(0.0, run.lr, run.warmup_steps,
                                          max(run.max_steps, run.warmup_steps + 1), end_value=run.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(run.grad_clip),
                     optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=run.weight_decay))
    opt_state = tx.init(params)
    step_fn = make_step(graphdef, tx)
    evaluator = HeldoutEval(nnx.merge(graphdef, params), tok, heldout, run.max_turns, run.max_response_tokens)
    rng = np.random.default_rng(run.seed)
    metrics_f = open(out / "metrics.jsonl", "w")
    eval_f = open(out / "eval.jsonl", "w")
    t0 = time.perf_counter()
    order: list[int] = []
    buf: Optional[dict] = None
    bi = 0
    result = {"stopped": "max_steps", "params": n_params}
    ema = None
    tokens = 0
    stop_requested = []  # SIGTERM/SIGINT: finish the step, write the checkpoint, stop
    import signal

    previous = {sig: signal.signal(sig, lambda *_: stop_requested.append(True))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(range(1, run.max_steps + 1), desc=f"sft {out.name}", disable=not progress)
    for step in bar:
        if stop_requested:
            result.update(stopped="signal", step=step - 1)
            break
        if buf is None or bi + run.rows_per_step > buf["input_ids"].shape[0]:
            perm = rng.permutation(len(seqs))
            buf = pack([seqs[i] for i in perm], run.row_len, tok.pad_id)
            keep = (buf["input_ids"].shape[0] // run.rows_per_step) * run.rows_per_step
            buf = {k: v[:keep] for k, v in buf.items()}
            bi = 0
        batch = {k: v[bi:bi + run.rows_per_step] for k, v in buf.items()}
        bi += run.rows_per_step
        params, opt_state, loss, gnorm = step_fn(params, opt_state, batch)
        loss = float(loss)
        tokens += int((batch["segment_ids"] > 0).sum())
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        el = time.perf_counter() - t0
        metrics_f.write(json.dumps({"step": step, "loss": loss, "grad_norm": float(gnorm), "lr": float(sched(step)),
                                    "tokens_per_s": tokens / el, "elapsed_s": el}) + "\n")
        metrics_f.flush()
        bar.set_postfix(loss=f"{ema:.3f}")
        if step % run.eval_every == 0 and ema < run.eval_after_loss:
            ev = evaluator(params)
            ev.update(step=step, elapsed_s=time.perf_counter() - t0, loss=ema)
            eval_f.write(json.dumps(ev) + "\n")
            eval_f.flush()
            bar.write(f"step {step}: held-out acc {ev['acc']:.3f} (loss {ema:.3f}, {ev['elapsed_s']:.0f} s)")
            done = None
            if run.stop_at_least is not None and ev["acc"] >= run.stop_at_least:
                done = "accuracy"
            if run.stop_band is not None and run.stop_band[0] <= ev["acc"] <= run.stop_band[1]:
                done = "band"
            if done:
                result.update(stopped=done, step=step, acc=ev["acc"])
                break
    bar.close()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    result["train_s"] = time.perf_counter() - t0
    model = nnx.merge(graphdef, params)
    save_pretrained(model, out / "model")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(run.tokenizer_dir) / f, out / "model" / f)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    asyncio.run(evaluator.sandbox.close())
    return result
