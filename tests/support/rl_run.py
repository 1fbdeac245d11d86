"""A tiny RL run for CLI tests: random student/teacher checkpoints, parquet data and a base config."""

import shutil
from pathlib import Path

import yaml
from conftest import build_tokenizer, make_hf_model

QUESTIONS = [("What is 12 * 13?", "156"), ("What is 7 + 35?", "42"), ("What is 99 - 17?", "82"),
             ("What is 6 * 9?", "54"), ("What is 144 / 12?", "12"), ("What is 5 ** 3?", "125")]


def _rows(pairs, source="math"):
    return [{"data_source": source, "prompt": [{"role": "user", "content": q + " Use Python; answer in \\boxed{}."}],
             "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {"index": i}}
            for i, (q, a) in enumerate(pairs)]


def _write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def build_rl_run(root: Path) -> tuple[Path, Path, dict]:
    """Tiny random student/teacher HF checkpoints (the student an over-confident copy of the teacher),
    train/val parquet files and a base config for `python -m sod_jax.train`, under ``root``."""
    tok = build_tokenizer(root / "tok")
    from sod_jax.chat import ChatTokenizer

    vocab = ChatTokenizer.from_dir(tok).vocab_size
    # The student is the teacher with an over-confident output distribution (final norm x8, i.e.
    # logits x8 through the tied head): exact reverse KL ~0.9 nats/token, and on-policy distillation
    # closes it by pushing down the student's own over-sampled tokens.
    import torch

    base = make_hf_model(seed=1, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         rope_theta=10000.0)
    dirs = {}
    for name in ("teacher", "student"):
        if name == "student":
            with torch.no_grad():
                base.model.norm.weight.mul_(8.0)
        d = root / name
        base.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, d / f)
        dirs[name] = d
    train = _write_parquet(root / "train.parquet", _rows(QUESTIONS[:4]))
    val = _write_parquet(root / "val.parquet", _rows(QUESTIONS[4:] + [(f"What is {a} + {a + 7}?", str(2 * a + 7))
                                                                       for a in range(11, 17)]))
    cfg = {
        "model": {"path": str(dirs["student"]), "dtype": "float32", "param_dtype": "float32", "remat": "none",
                  "attention_block": 0},
        "teacher": {"path": str(dirs["teacher"]), "dtype": "float32", "param_dtype": "float32"},
        "data": {"train_files": [str(train)], "val_files": [str(val)], "max_prompt_length": 512, "seed": 1},
        "rollout": {"n": 2, "max_response_length": 40, "max_assistant_turns": 2, "num_slots": 4,
                    "decode_steps": 8, "prefill_buckets": [512]},
        "reward": {"overlong_buffer_len": 8, "workers": 2},
        "sandbox": {"workers": 2},
        "optim": {"lr": 1.0e-3},
        "train": {"prompts_per_step": 2, "mini_batches": 2, "total_steps": 3, "eval_every": 3,
                  "length_buckets": [576, 640]},
        "eval": {"n": 1, "ks": [1], "max_response_length": 40, "kl_prompts": 8},
        "checkpoint": {"save_every": 2},
        "mesh": {"data": 1, "fsdp": 2, "tensor": 1},
    }
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    return root, base, dirs


