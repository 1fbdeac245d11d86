"""SFT: the assistant-token loss mask against transformers' chat template, packing against
sequences run alone, gradient accumulation, hooks, config errors, and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from support.sft_conversations import make_rows, tool_conversation, write_jsonl

from sod_jax import optim
from sod_jax.chat import ChatTokenizer
from sod_jax.config import ConfigError, load_config
from sod_jax.models import Qwen3Config, init_model
from sod_jax.sft.packing import SFTDataError, build_batch, pack_rows, tokenize_conversation
from sod_jax.sft.step import SFTState, build_train_step, packed_nll, plan_steps, prepare_examples
from sod_jax.sft.trainer import SFTHook, SFTTrainer

REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, dtype="float32", param_dtype="float32",
            remat="none")


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir):
    return ChatTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


# ---------------------------------------------------------------------------------------------
# The loss mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", [True, False])
def test_loss_mask_equals_assistant_spans_of_transformers_rendering(chat_tok, hf_tok, system):
    """Independent computation: for each assistant message j, transformers renders the conversation
    up to j with the generation prompt and through j; the tokens in between (without the newline the
    template puts after <|im_end|>) are exactly that message's tokens."""
    row = tool_conversation(17, 25, 3, system=system)
    msgs, tools = row["messages"], row["tools"]
    full = _ids(hf_tok.apply_chat_template(msgs, tools=tools, tokenize=True))
    expected = np.zeros(len(full), np.int8)
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    n_assistant = 0
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        n_assistant += 1
        before = _ids(hf_tok.apply_chat_template(msgs[:j], tools=tools, add_generation_prompt=True, tokenize=True))
        through = _ids(hf_tok.apply_chat_template(msgs[:j + 1], tools=tools, tokenize=True))
        assert full[:len(before)] == before and full[:len(through)] == through
        assert hf_tok.decode(before).endswith("<|im_start|>assistant\n")
        assert through[-2] == im_end and hf_tok.decode(through[-1:]) == "\n"
        expected[len(before):len(through) - 1] = 1
    assert n_assistant == 3

    ex = tokenize_conversation(chat_tok, msgs, tools)
    assert ex.ids.tolist() == full  # same tokens as transformers' whole-string tokenization
    assert ex.loss_mask.tolist() == expected.tolist()  # token by token
    # What the mask covers, in words: think text, tool-call text and <|im_end|>; never the header,
    # the tool response or the user turn.
    trained = hf_tok.decode([t for t, m in zip(full, ex.loss_mask) if m])
    assert "First add 17 and 25 with Python." in trained and '"code": "print(17 + 25)"' in trained
    assert trained.count("<|im_end|>") == 3 and "<|im_start|>" not in trained
    assert "<tool_response>" not in trained and "Compute (17 + 25)" not in trained
    assert "\\boxed{126}" in trained
    # the first token of every assistant turn is a target, the token after <|im_end|> is not
    starts = [i for i in range(1, len(full)) if ex.loss_mask[i] and not ex.loss_mask[i - 1]]
    assert len(starts) == 3 and all(hf_tok.decode(full[i - 1:i]) == "\n"
                                    and hf_tok.decode(full[:i]).endswith("<|im_start|>assistant\n") for i in starts)
    ends = [i for i in range(len(full) - 1) if ex.loss_mask[i] and not ex.loss_mask[i + 1]]
    assert len(ends) == 3 and all(full[i] == im_end for i in ends) and ex.loss_mask[-1] == 0  # the final "\n"


def test_conversations_the_mask_cannot_handle_are_rejected(chat_tok):
    with pytest.raises(SFTDataError, match="row 7: no assistant message"):
        tokenize_conversation(chat_tok, [{"role": "user", "content": "hi"}], index=7)
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x<|im_end|>y"}]
    with pytest.raises(SFTDataError, match="message 1 contains the template's control text"):
        tokenize_conversation(chat_tok, bad)


def test_weight_0_assistant_messages_are_context_not_targets(chat_tok):
    """OpenAI's fine-tuning layout: an assistant message with "weight": 0 keeps its tokens in the
    sequence (same ids) but out of the loss."""
    msgs = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "It is 5."},
            {"role": "user", "content": "Check again."},
            {"role": "assistant", "content": "It is 4."}]
    full = tokenize_conversation(chat_tok, msgs)
    ctx = tokenize_conversation(chat_tok, [*msgs[:1], {**msgs[1], "weight": 0}, *msgs[2:]])
    assert (full.ids == ctx.ids).all()
    wrong = chat_tok.encode("It is 5.")
    right = chat_tok.encode("It is 4.")
    ids = list(full.ids)
    at = next(i for i in range(len(ids)) if ids[i:i + len(wrong)] == wrong)
    assert full.loss_mask[at:at + len(wrong)].all() and not ctx.loss_mask[at:at + len(wrong)].any()
    at = next(i for i in range(len(ids)) if ids[i:i + len(right)] == right)
    assert ctx.loss_mask[at:at + len(right)].all()
    assert int(full.loss_mask.sum()) - int(ctx.loss_mask.sum()) == int(full.loss_mask[:at].sum()) - \
        int(ctx.loss_mask[:at].sum()) > len(wrong)  # the whole first turn, <|im_end|> included
    with pytest.raises(SFTDataError, match="message 1 has weight 0.5"):
        tokenize_conversation(chat_tok, [msgs[0], {**msgs[1], "weight": 0.5}])
    with pytest.raises(SFTDataError, match="every assistant message has weight 0"):
        tokenize_conversation(chat_tok, [msgs[0], {**msgs[1], "weight": 0}])


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 7, 2, 4], 10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 7, 2, 4][i] for i in r) <= 10 for r in rows)
    assert rows == [[0, 4], [1, 2]] or len(rows) == 3  # 7+3, 5+4, 2 -> FFD gives {7,3},{5,4},{2}
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([11], 10)


@pytest.fixture(scope="module")
def tiny_examples(chat_tok):
    ex, _ = prepare_examples(make_rows(5, seed=3), chat_tok, max_length=1024)
    return ex


@pytest.mark.parametrize("block", [0, 128])
def test_packed_loss_equals_sum_of_sequences_alone(tiny_examples, block):
    """One packed row of 3 conversations (+ padding) gives the summed NLL, the token count and the
    gradient of the three run alone (plain forward, dense [T, V] logits). ``block`` > 0 runs the
    packed row through blocked attention with segments."""
    cfg = Qwen3Config(**TINY, attention_block=block)
    model = init_model(cfg, seed=1)
    from flax import nnx

    graphdef, params = nnx.split(model)
    exs = tiny_examples[:3]
    L = sum(len(e) for e in exs) + 37
    batch = build_batch(exs, [[0, 1, 2]], 1, 1, L)
    args = [jnp.asarray(a[0]) for a in batch]

    def alone(p, ex):
        m = nnx.merge(graphdef, p)
        logits = m(jnp.asarray(ex.ids)[None])[0]  # [T, V]
        lp = jax.nn.log_softmax(logits[:-1], axis=-1)[jnp.arange(len(ex) - 1), ex.ids[1:]]
        mask = jnp.asarray(ex.loss_mask[1:], jnp.float32)
        return -jnp.sum(lp * mask)

    (nll, n), g_packed = jax.value_and_grad(lambda p: packed_nll(graphdef, p, *args, chunk=64), has_aux=True)(params)
    sums = [alone(params, e) for e in exs]
    n_alone = sum(int(e.loss_mask[1:].sum()) for e in exs)
    assert int(n) == n_alone
    assert abs(float(nll) - float(sum(sums))) / n_alone <= 1e-5
    assert abs(float(nll) - float(sum(sums))) <= 1e-5 * max(1.0, abs(float(sum(sums))))
    g_alone = jax.grad(lambda p: sum(alone(p, e) for e in exs))(params)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)


def test_build_batch_segments_positions_and_first_token():
    from sod_jax.sft.packing import Example

    a = Example(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.int8))
    b = Example(np.array([8, 9], np.int32), np.array([1, 1], np.int8))
    bt = build_batch([a, b], [[0, 1]], 2, 1, 6)
    assert bt.input_ids[0, 0].tolist() == [5, 6, 7, 8, 9, 0]
    assert bt.positions[0, 0].tolist() == [0, 1, 2, 0, 1, 0]
    assert bt.segment_ids[0, 0].tolist() == [1, 1, 1, 2, 2, 0]
    # b's first token would be predicted from a's last token: never a target
    assert bt.loss_mask[0, 0].tolist() == [0, 1, 1, 0, 1, 0]
    assert not bt.loss_mask[1].any() and not bt.segment_ids[1].any()  # an unused micro-batch is empty


def test_plan_covers_every_conversation_once_per_epoch():
    lengths = [30, 50, 10, 90, 60, 20, 70]
    plan = plan_steps(lengths, batch_size=3, epochs=2, pack_length=100, rows_per_micro=2, seed=5)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 6
    for e in range(2):
        seen = sorted(i for step in plan.steps[3 * e:3 * e + 3] for row in step for i in row)
        assert seen == list(range(7))
    assert plan.micro_batches == max(-(-len(s) // 2) for s in plan.steps)
    again = plan_steps(lengths, batch_size=3, epochs=2, pack_length=100, rows_per_micro=2, seed=5)
    assert again.steps == plan.steps  # a pure function of the seed: a step counter is a data position
    assert plan_steps(lengths, batch_size=3, epochs=2, pack_length=100, rows_per_micro=2, seed=5,
                      max_steps=4).total_steps == 4


def test_schedule_warmup_then_cosine():
    cfg = load_config(overrides=["sft.lr=1.0", "sft.warmup_ratio=0.1", "sft.min_lr_ratio=0.1"], job="sft").sft
    sched = optim.make_schedule(optim.OptimizerSpec.from_sft(cfg, 100))
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6 and abs(float(sched(10)) - 1.0) < 1e-6
    mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90))
    assert abs(float(sched(55)) - mid) < 1e-5 and abs(float(sched(100)) - 0.1) < 1e-6


def test_gradient_accumulation_equals_one_big_micro_batch(tiny_examples):
    """The same 4 rows as 4 micro-batches of 1 row or 1 micro-batch of 4 rows: the same update."""
    from flax import nnx

    cfg = load_config(overrides=["sft.lr=1e-2", "sft.warmup_ratio=0.0"], job="sft")
    model = init_model(Qwen3Config(**TINY), seed=2)
    graphdef, params = nnx.split(model)
    sched = optim.make_schedule(optim.OptimizerSpec.from_sft(cfg.sft, 10))
    tx = optax.sgd(1.0)  # the update is the accumulated gradient itself (Adam would amplify rounding noise)
    step = build_train_step(graphdef, tx, sched, chunk=64)
    L = max(len(e) for e in tiny_examples[:4])
    rows = [[0], [1], [2], [3]]
    outs = []
    for a, r in [(4, 1), (1, 4)]:
        p = jax.tree.map(jnp.copy, params)
        state = SFTState(jnp.zeros((), jnp.int32), p, tx.init(p))
        batch = build_batch(tiny_examples, rows, a, r, L)
        state, met = step(state, type(batch)(*(jnp.asarray(x) for x in batch)))
        outs.append((state, {k: float(v) for k, v in met.items()}))
    (s1, m1), (s2, m2) = outs
    assert m1["loss_tokens"] == m2["loss_tokens"] and abs(m1["loss"] - m2["loss"]) < 1e-5
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-5 * m2["grad_norm"] and int(s1.step) == 1
    for x, y, p0 in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), jax.tree.leaves(params)):
        d1, d2 = np.asarray(x - p0), np.asarray(y - p0)
        np.testing.assert_allclose(d1, d2, atol=1e-5 * np.abs(d2).max() + 1e-8)
    moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(params)))
    assert moved > 1e-4  # the update did something


# ---------------------------------------------------------------------------------------------
# The loop: hooks, early stop, run files (in-process, 8 fake devices: fsdp=8 mesh)
# ---------------------------------------------------------------------------------------------


class _Recorder(SFTHook):
    def __init__(self, stop_at_eval=None):
        self.events, self.stop_at_eval = [], stop_at_eval

    def on_start(self, trainer):
        self.events.append(("start", trainer.step))

    def on_step(self, trainer, step):
        self.events.append(("step", step))

    def on_metrics(self, trainer, step, metrics):
        self.events.append(("metrics", step, round(metrics["loss"], 6)))

    def on_eval(self, trainer, step, metrics):
        self.events.append(("eval", step))
        return self.stop_at_eval is not None and step >= self.stop_at_eval

    def on_export(self, trainer, step, path):
        self.events.append(("export", step, Path(path).name))

    def on_end(self, trainer):
        self.events.append(("end", trainer.step))


def test_trainer_on_a_mesh_with_hooks_and_stop(tmp_path, chat_tok, tokenizer_dir):
    from sod_jax import parallel

    rows = make_rows(12, seed=4)
    exs, stats = prepare_examples(rows, chat_tok, max_length=1024)
    assert stats["kept"] == 12 and stats["loss_tokens"] < stats["tokens"]
    cfg = load_config(overrides=[f"sft.out_dir={tmp_path / 'run'}", "sft.batch_size=4", "sft.epochs=3",
                                 "sft.eval_every=2", "sft.save_every=2", "sft.lr=1e-3", "model.logprob_chunk=64",
                                 "sft.micro_batch_rows=8", "logging.plots=true", "sft.max_length=1024"], job="sft")
    mesh = parallel.make_mesh(1, -1, 1)
    model = parallel.shard_module(init_model(Qwen3Config(**TINY), seed=0), mesh)
    rec = _Recorder(stop_at_eval=4)
    trainer = SFTTrainer(cfg, model, exs[:8], exs[8:], tokenizer_dir=str(tokenizer_dir), mesh=mesh, hooks=[rec],
                         progress=False)
    assert trainer.plan.total_steps == 6 and trainer.plan.rows_per_micro == 8
    res = trainer.run()
    assert res.stop_reason == "hook" and res.steps == 4
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [e[1] for e in rec.events if e[0] == "step"] == [1, 2, 3, 4]
    assert [e[1] for e in rec.events if e[0] == "metrics"] == [1, 2, 3, 4]
    assert [e[1] for e in rec.events if e[0] == "eval"] == [0, 2, 4]  # before training, then every 2 steps
    assert ("export", 2, "step_000002") in rec.events and ("export", 4, "model") in rec.events
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]  # one record per step, held-out loss merged in
    assert all({"loss", "grad_norm", "lr", "tokens_per_s"} <= set(r) for r in recs[1:])
    assert all("val_loss" in recs[i] for i in (0, 2, 4)) and "val_loss" not in recs[3]
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert (run / "plots" / "sft_loss.png").is_file()
    # the step compiled once for all steps
    assert trainer.step_fn._cache_size() == 1


def test_early_stop_by_held_out_loss(tmp_path, chat_tok):
    rows = make_rows(6, seed=5)
    exs, _ = prepare_examples(rows, chat_tok, max_length=1024)
    # lr so large that the held-out loss cannot keep improving
    cfg = load_config(overrides=[f"sft.out_dir={tmp_path}", "sft.batch_size=2", "sft.epochs=20", "sft.eval_every=1",
                                 "sft.early_stop_patience=2", "sft.lr=5.0", "sft.warmup_ratio=0", "sft.grad_clip=100.0",
                                 "model.logprob_chunk=64", "logging.plots=false", "sft.max_length=1024"], job="sft")
    trainer = SFTTrainer(cfg, init_model(Qwen3Config(**TINY), seed=0), exs[:4], exs[4:], progress=False)
    res = trainer.run()
    assert res.stop_reason == "early_stop" and res.steps < trainer.plan.total_steps
    vals = [r["val_loss"] for r in res.history if "val_loss" in r]
    assert min(vals) == res.best_val_loss and vals[-1] > res.best_val_loss and vals[-2] > res.best_val_loss


def test_sft_config_errors_name_the_key(tmp_path):
    from sod_jax.sft.cli import check_sft_config

    with pytest.raises(ConfigError) as e:
        check_sft_config(load_config(overrides=["sft.batch_size=0"], job="sft"))
    msg = str(e.value)
    assert "sft.train_files is empty" in msg and "set model.path" in msg and "sft.batch_size=0" in msg
    with pytest.raises(ConfigError, match=r"data file 'nope.parquet'.*does not exist"):
        check_sft_config(load_config(overrides=["sft.train_files=[nope.parquet]", "sft.init=cpu-tiny"], job="sft"))
    with pytest.raises(ConfigError, match=r"model.path 'checkpoints/x' is not a directory.*huggingface-cli download"):
        check_sft_config(load_config(overrides=["model.path=checkpoints/x"], job="sft"))
    # the RL-only teacher requirement does not apply to SFT configs, but still to training
    load_config(job="sft")
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config()


def test_paper_sft_configs_resolve():
    for size in ("0.6b", "1.7b"):
        cfg = load_config(REPO / "configs" / f"sft_qwen3_{size}.yaml", job="sft")
        s = cfg.sft
        assert (s.lr, s.b1, s.b2, s.weight_decay, s.warmup_ratio, s.epochs, s.batch_size, s.max_length, s.grad_clip) == (
            1e-5, 0.9, 0.95, 0.01, 0.1, 5, 128, 32768, 1.0)
        assert s.schedule == "cosine"


# ---------------------------------------------------------------------------------------------
# The CLI end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_loss_falls_and_export_matches_transformers(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    write_jsonl(tmp_path / "train.jsonl", make_rows(24, seed=0))
    write_jsonl(tmp_path / "val.jsonl", make_rows(4, seed=1))
    arch = {k: v for k, v in TINY.items() if k not in ("dtype", "param_dtype", "remat")}
    conf = {"model": {"dtype": "float32", "remat": "none", "logprob_chunk": 128},
            "sft": {"train_files": [str(tmp_path / "train.jsonl")], "val_files": [str(tmp_path / "val.jsonl")],
                    "tokenizer": str(tokenizer_dir), "init": "cpu-tiny", "init_overrides": arch,
                    "max_length": 1024, "batch_size": 4, "epochs": 50, "max_steps": 50, "lr": 3e-3,
                    "eval_every": 25, "out_dir": str(tmp_path / "run")},
            "mesh": {"fsdp": 1}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(conf))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "sod_jax.sft", "--config", str(tmp_path / "sft.yaml"), "--no-progress",
                        "sft.save_every=20", "--plan", "cpu:1"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())  # the pre-flight plan (--plan) ran, and let the run go on
    assert plan["job"] == "sft" and plan["programs"][0]["program"] == "sft_step" and plan["programs"][0]["compiled"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 50
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]  # before training, at step 25 and at step 50
    assert yaml.safe_load((run / "config.yaml").read_text())["sft"]["max_steps"] == 50
    assert (run / "hf" / "step_000020" / "model.safetensors").is_file() and (run / "hf" / "step_000040").is_dir()
    # the export loads in transformers with our logits
    from sod_jax.models import load_pretrained

    ours = load_pretrained(run / "model", dtype="float32")
    hf = Qwen3ForCausalLM.from_pretrained(run / "model", torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    ids = _ids(tok.apply_chat_template(make_rows(1, seed=9)[0]["messages"], tokenize=True))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    mine = np.asarray(ours(jnp.asarray([ids]))[0])
    assert np.max(np.abs(mine - theirs)) <= 1e-4
