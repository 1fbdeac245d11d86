"""``python -m sod_jax.sft --config FILE [section.key=value ...]``: cold-start SFT.

Fine-tunes ``model.path`` (or random weights of ``sft.init``) on multi-turn tool conversations
(``sft.train_files``: rows with ``messages`` and ``tools``), with the loss on assistant tokens only
(think text, text, tool calls and ``<|im_end|>``; never the system, user or tool tokens, nor the
``<|im_start|>assistant`` header). Conversations are packed into rows of ``sft.pack_length`` tokens.

Writes to ``sft.out_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (per step:
loss, grad_norm, lr, tokens_per_s, ...; held-out ``val_loss`` every ``sft.eval_every`` steps),
``data_stats.json``, ``plots/sft_loss.png``, HF checkpoints ``hf/step_N`` every ``sft.save_every``
steps and the final one in ``model/`` (``transformers`` loads them; tokenizer files included).
``sft.out_dir`` and ``checkpoint.dir`` may be ``gs://`` URLs (docs/checkpoints.md, shared storage).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from sod_jax import parallel, paths
from sod_jax.chat import ChatError, ChatTokenizer
from sod_jax.checkpoint import Checkpointer
from sod_jax.config import ConfigError, add_config_args, add_plan_arg, config_from_args
from sod_jax.data import DataError, load_rows
from sod_jax.loop import CheckpointHook, PreemptionHook
from sod_jax.models import CheckpointError, init_model, load_pretrained, preset
from sod_jax.models.hf import config_from_hf
from sod_jax.plan.preflight import preflight_plan
from sod_jax.sft.accuracy_hook import check_accuracy_config
from sod_jax.sft.packing import SFTDataError
from sod_jax.sft.step import prepare_examples
from sod_jax.sft.trainer import SFTTrainer
from sod_jax.startup import start_job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_plan_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def check_sft_config(cfg: Any) -> None:
    """Start-up checks of the ``sft`` section (each message names the key and what to supply)."""

    s, problems = cfg.sft, []
    if not s.train_files:
        problems.append("sft.train_files is empty: give the SFT parquet/jsonl files (rows with `messages`, `tools`)")
    for f in list(s.train_files) + list(s.val_files):
        if not paths.is_file(f):
            problems.append(f"data file '{f}' (sft.train_files / sft.val_files) does not exist: download or "
                            "generate it, or fix the path")
    if s.init is None and not cfg.model.path:
        problems.append("set model.path (the HF checkpoint to fine-tune, e.g. a local Qwen3-0.6B directory) or "
                        "sft.init (a preset name such as cpu-tiny, or a config.json) to start from random weights")
    elif s.init is None and not Path(cfg.model.path).is_dir():
        problems.append(f"model.path '{cfg.model.path}' is not a directory: download the checkpoint "
                        "(e.g. `huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR`) and set model.path=DIR")
    tok = s.tokenizer or cfg.model.path
    if not tok:
        problems.append("sft.tokenizer is unset and so is model.path: give the directory holding tokenizer.json")
    elif not (Path(tok) / "tokenizer.json").is_file():
        problems.append(f"no tokenizer.json in '{tok}' (sft.tokenizer, else model.path)")
    for key, ok in [("max_length", s.max_length >= 2), ("batch_size", s.batch_size >= 1), ("epochs", s.epochs >= 1),
                    ("max_steps", s.max_steps >= 0), ("micro_batch_rows", s.micro_batch_rows >= 0),
                    ("pack_length", s.pack_length == 0 or s.pack_length >= s.max_length),
                    ("lr", s.lr > 0), ("warmup_ratio", 0 <= s.warmup_ratio < 1), ("min_lr_ratio", 0 <= s.min_lr_ratio <= 1),
                    ("grad_clip", s.grad_clip > 0), ("val_fraction", 0 <= s.val_fraction < 1),
                    ("eval_every", s.eval_every >= 0), ("save_every", s.save_every >= 0),
                    ("early_stop_patience", s.early_stop_patience >= 0)]:
        if not ok:
            extra = " (it must be >= sft.max_length, or 0)" if key == "pack_length" else ""
            problems.append(f"sft.{key}={getattr(s, key)!r} is out of range{extra}")

    problems += check_accuracy_config(s)
    if problems:
        raise ConfigError("invalid SFT config:\n  - " + "\n  - ".join(problems))


def build_model(cfg: Any, tokenizer: Any, mesh: Any) -> Any:
    """``model.path`` loaded (placed on ``mesh``), or random weights of ``sft.init``."""

    m, s = cfg.model, cfg.sft
    runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
                   attention_block=m.attention_block)
    if s.init is None:
        model = load_pretrained(m.path, mesh=mesh, **runtime)
    else:
        if Path(s.init).is_file():
            arch = config_from_hf(json.loads(Path(s.init).read_text()), s.init, **runtime)
        else:
            arch = preset(s.init, **runtime)
        special = dict(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.token_id("<|endoftext|>"))
        arch = arch.replace(**{**special, **s.init_overrides})
        model = init_model(arch, seed=s.seed)
        if mesh is not None:
            parallel.shard_module(model, mesh)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; use a matching tokenizer (sft.tokenizer) or a larger "
                         "vocab_size (sft.init_overrides)")
    return model


def split_val(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of ``rows`` (at least one when fraction > 0), chosen by ``seed``."""

    if fraction <= 0:
        return rows, []
    n_val = max(1, int(round(fraction * len(rows))))
    perm = np.random.default_rng([seed, 7919]).permutation(len(rows))
    val = set(perm[:n_val].tolist())
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def run(cfg: Any, *, hooks=(), progress: bool = True) -> Any:
    """Train as the config says; returns the :class:`sod_jax.sft.trainer.SFTResult`."""

    s = cfg.sft
    check_sft_config(cfg)
    tok_dir = s.tokenizer or cfg.model.path
    tokenizer = ChatTokenizer.from_dir(tok_dir)
    out = paths.as_path(s.out_dir)
    if jax.process_index() == 0:
        paths.makedirs(out)
        (out / "config.yaml").write_text(cfg.to_yaml())
    train_rows, train_stats = load_rows(s.train_files, "sft", on_bad_row=cfg.data.on_bad_row)
    if s.val_files:
        val_rows, val_stats = load_rows(s.val_files, "sft", on_bad_row=cfg.data.on_bad_row)
    else:
        train_rows, val_rows = split_val(train_rows, s.val_fraction, s.seed)
        val_stats = {"rows": len(val_rows), "split_from_train": True}
    kw = dict(max_length=s.max_length, overlong=s.overlong, enable_thinking=s.enable_thinking, progress=progress)
    train_ex, train_tok = prepare_examples(train_rows, tokenizer, **kw)
    val_ex, val_tok = prepare_examples(val_rows, tokenizer, **kw) if val_rows else ([], {})
    stats = {"train": {**train_stats, **train_tok}, "val": {**val_stats, **val_tok}}
    if not train_ex:
        raise ValueError(f"no training conversation is left after the length filter (sft.max_length={s.max_length}, "
                         f"sft.overlong={s.overlong}): {json.dumps(stats['train'])}")
    preflight_plan(cfg, job="sft", out_dir=s.out_dir, is_main=jax.process_index() == 0)  # before any weights load
    mesh = parallel.mesh_from_config(cfg.mesh)
    if mesh.size == 1:
        mesh = None
    model = build_model(cfg, tokenizer, mesh)

    # SIGTERM/SIGINT become a stop at a step boundary, which the checkpoint hook after it saves;
    # orbax checkpoints with auto-resume (cfg.checkpoint).
    ck = cfg.checkpoint
    hooks = [*hooks, PreemptionHook(),
             CheckpointHook(Checkpointer.from_config(ck, s.out_dir), save_every=ck.save_every, resume=ck.resume)]
    if s.accuracy_every:  # after the checkpoint hook: it sees the restored step
        from sod_jax.sft.accuracy_hook import AccuracyHook

        hooks.append(AccuracyHook(cfg, tokenizer))
    trainer = SFTTrainer(cfg, model, train_ex, val_ex, tokenizer_dir=tok_dir, mesh=mesh, hooks=hooks,
                         progress=progress)
    p = trainer.plan
    real = sum(len(train_ex[i]) for step in p.steps for row in step for i in row)
    fill = real / max(p.total_steps * p.micro_batches * p.rows_per_micro * p.pack_length, 1)
    stats["plan"] = dict(total_steps=p.total_steps, steps_per_epoch=p.steps_per_epoch, micro_batches=p.micro_batches,
                         rows_per_micro=p.rows_per_micro, pack_length=p.pack_length, fill=fill,
                         params=model.config.num_params())
    if jax.process_index() == 0:
        (out / "data_stats.json").write_text(json.dumps(stats, indent=2))
        t = stats["train"]
        print(f"sft: {t['kept']} conversations ({t['dropped_overlong']} over {s.max_length} tokens dropped, "
              f"{t['truncated']} truncated), {t['loss_tokens']} of {t['tokens']} tokens trained; "
              f"{p.total_steps} steps of {p.micro_batches} x {p.rows_per_micro} rows x {p.pack_length} tokens "
              f"({fill:.0%} real tokens; a low figure means sft.pack_length or sft.micro_batch_rows is larger "
              "than the batch needs)", file=sys.stderr)
    return trainer.run()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, job="sft")
    code = start_job(cfg.distributed, cache_dir=cfg.compile.cache_dir, out_dir=cfg.sft.out_dir, log_level=logging.INFO)
    if code is not None:
        return code

    try:
        res = run(cfg, progress=not args.no_progress)
    except (ConfigError, DataError, SFTDataError, ChatError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = f", best held-out loss {res.best_val_loss:.4f}" if res.best_val_loss is not None else ""
    loss = f"{res.final_loss:.4f}" if res.final_loss is not None else "n/a"
    if jax.process_index() == 0:  # one summary line per run, not one per process
        print(f"sft: {res.steps} steps ({res.stop_reason}), last train loss {loss}{best}; "
              f"model: {res.model_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
