"""The bench CLI prints JSON lines in the documented shape (no timing assertions)."""

import json
import subprocess
import sys


def test_bench_memory_prints_json_lines():
    out = subprocess.run([sys.executable, "-m", "sod_jax.bench", "memory"], capture_output=True, text=True,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["mode"] for r in rows] == ["forward", "value_and_grad", "attention_value_and_grad"]
    for r in rows:
        assert {"bench", "ours", "baseline", "ratio"} <= set(r) and r["bench"] == "memory"
        assert r["ratio"] == round(r["ours"] / r["baseline"], 5)
    for r in rows[:2]:
        assert (r["T"], r["V"]) == (8192, 151936)
        assert r["ours_over_one_fp32_TxV"] < 1 / 8
    attn = rows[2]
    assert attn["baseline"] >= 16 * 8192 * 8192 * 4  # the dense form holds fp32 [heads, T, T] scores
    assert attn["ratio"] < 1 / 8


def run_bench(*args):
    out = subprocess.run([sys.executable, "-m", "sod_jax.bench", *args], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_bench_sod_weights_small():
    (row,) = run_bench("sod-weights", "--batch", "4", "--seq", "256", "--steps", "3", "--repeats", "2")
    assert row["bench"] == "sod-weights" and row["ours"] > 0 and row["baseline"] > 0
    assert abs(row["ratio"] - row["ours"] / row["baseline"]) < 0.05 * row["ratio"] + 0.1


def test_bench_train_step_small():
    (row,) = run_bench("train-step", "--batch", "4", "--seq", "64", "--mini-batches", "2", "--repeats", "1")
    assert row["bench"] == "train-step" and row["unit"] == "tokens/s"
    assert row["ours"] > 0 and row["baseline"] > 0 and 0 < row["mfu"] and row["update_gflop"] > 0


def test_bench_rollout_small():
    rows = run_bench("rollout", "--prompts", "3", "--slots", "2", "--new-tokens", "8", "--min-prompt", "4",
                     "--max-prompt", "9", "--repeats", "1", "--preset", "bench-student")
    assert [r["mode"] for r in rows] == ["greedy", "sampled"]
    for r in rows:
        assert r["bench"] == "rollout" and r["ours"] > 0 and r["baseline"] > 0 and r["new_tokens"] == 8


def test_bench_sandbox_small():
    rows = run_bench("sandbox", "--runs", "8", "--concurrency", "4")
    assert [r["backend"] for r in rows] == ["local", "server"]
    for r in rows:
        assert r["bench"] == "sandbox" and r["ours"] > 0 and r["baseline"] > 0 and r["confined"] is True
        assert r["p99_ms"] >= r["p50_ms"] > 0
