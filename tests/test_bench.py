"""The benches compute what they claim: both sides of each comparison give the same result, and
the CLI prints JSON lines in the documented shape (no timing assertions). The subprocess runs of
the CLI are marked slow; the in-process checks are the fast lane."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from sod_jax.bench.sod_weights import loop_step_weights

CLI_RUNS = {
    "sod-weights": ["sod-weights", "--batch", "4", "--seq", "256", "--steps", "3", "--repeats", "2"],
    "train-step": ["train-step", "--batch", "4", "--seq", "64", "--mini-batches", "2", "--repeats", "1"],
    "rollout": ["rollout", "--prompts", "3", "--slots", "2", "--devices", "2", "--new-tokens", "8", "--min-prompt", "4",
                "--max-prompt", "9", "--repeats", "1", "--preset", "bench-student", "--straggler", "80"],
    "rl-step": ["rl-step", "--steps", "1", "--max-response", "48"],
    "memory": ["memory"],
    "weight-sync": ["weight-sync", "--preset", "cpu-tiny", "--devices", "2", "--repeats", "1"],
}
# One child process runs every bench command through the CLI's own entry point (imports paid once).
RUNNER = """
import json, sys
from sod_jax.bench.__main__ import main
for name, argv in json.loads(sys.argv[1]).items():
    print("### " + name, flush=True)
    main(argv)
"""


@pytest.fixture(scope="module")
def cli_rows():
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(CLI_RUNS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    rows, name = {}, None
    for line in out.stdout.splitlines():
        if line.startswith("### "):
            name = line[4:]
            rows[name] = []
        elif line.strip():
            rows[name].append(json.loads(line))
    assert set(rows) == set(CLI_RUNS)
    return rows


def test_loop_step_weights_is_the_definition():
    """The per-token loop every SOD-weight check uses, on a hand-computed row: steps [0,2), [3,4),
    [5,7) with d = 0.5, 0.25, 1.0: w = 1, min(0.5/0.25, 1.2) = 1.2, 0.5/1.0 = 0.5; tools/padding 0."""
    s = np.zeros((1, 8), np.float32)
    q = np.array([[0.5, -0.5, 9.0, 0.25, 9.0, 1.0, -1.0, 9.0]], np.float32)
    m = np.array([[1, 1, 0, 1, 0, 1, 1, 0]])
    w = loop_step_weights(s, q, m, eps=0.0, delta=0.2)
    np.testing.assert_allclose(w, [[1, 1, 0, 1.2, 0, 0.5, 0.5, 0]], rtol=1e-6)
    assert loop_step_weights(s, q, np.zeros_like(m), 1e-6, 0.2).sum() == 0  # a row without steps


def test_sod_weights_bench_sides_agree():
    from sod_jax.bench import sod_weights

    (row,) = sod_weights.run(argparse.Namespace(batch=4, seq=256, steps=3, repeats=1))
    assert row["bench"] == "sod-weights" and row["max_abs_diff"] <= 1e-6


def test_train_step_bench_sides_agree():
    """Ours and the PyTorch baseline start from the same weights; their first updates' losses agree."""
    from sod_jax.bench import train_step

    (row,) = train_step.run(argparse.Namespace(batch=4, seq=64, mini_batches=2, repeats=1, attention_block=32))
    assert row["bench"] == "train-step" and row["unit"] == "tokens/s" and row["update_gflop"] > 0
    assert abs(row["first_pg_loss_baseline"]) > 1e-4  # a loss that can disagree
    np.testing.assert_allclose(row["first_pg_loss_ours"], row["first_pg_loss_baseline"], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_bench_memory_prints_json_lines(cli_rows):
    rows = cli_rows["memory"]
    assert [r["mode"] for r in rows] == ["forward", "value_and_grad", "attention_value_and_grad"]
    for r in rows:
        assert {"bench", "ours", "baseline", "ratio"} <= set(r) and r["bench"] == "memory"
    for r in rows[:2]:
        assert (r["T"], r["V"]) == (8192, 151936)
        assert r["ours_over_one_fp32_TxV"] < 1 / 8
        assert r["baseline"] >= 8192 * 151936 * 4  # the naive form really holds fp32 [T, V] logits
    attn = rows[2]
    assert attn["baseline"] >= 16 * 8192 * 8192 * 4  # the dense form holds fp32 [heads, T, T] scores
    assert attn["ours"] < attn["baseline"] / 8


@pytest.mark.slow
def test_bench_cli_sod_weights_and_train_step(cli_rows):
    (row,) = cli_rows["sod-weights"]
    assert row["bench"] == "sod-weights" and row["max_abs_diff"] <= 1e-6 and {"ours", "baseline", "ratio"} <= set(row)
    (row,) = cli_rows["train-step"]
    assert row["bench"] == "train-step" and {"ours", "baseline", "ratio", "mfu"} <= set(row)


@pytest.mark.slow
def test_bench_rollout_small(cli_rows):
    rows = list(cli_rows["rollout"])
    assert [r["mode"] for r in rows] == ["greedy", "sampled", "straggler"]
    straggler = rows.pop()
    assert straggler["straggler_tokens"] == 80 and straggler["tail_slots"] == 1 and straggler["ours"] > 0
    assert straggler["greedy_equal_fraction"] == 1.0  # ragged reads change no token
    for r in rows:
        assert r["bench"] == "rollout" and r["ours"] > 0 and r["baseline"] > 0 and r["new_tokens"] == 8
        if r["mode"] != "straggler":  # the slots split over the 2 (fake) devices: one each
            assert r["slot_devices"] == 2 and r["slots_per_device"] == 1
        assert r["tokens_per_request"] == [8]  # both sides generated exactly 8 tokens per request
    assert rows[0]["greedy_equal_fraction"] == 1.0  # the same greedy tokens as transformers


@pytest.mark.slow
def test_bench_rl_step_splits_one_step(cli_rows):
    (row,) = cli_rows["rl-step"]
    assert row["bench"] == "rl-step" and row["trajectories"] == 64
    parts = row["time/rollout"] + row["time/reward"] + row["time/update"]
    # the ratio is of the unrounded times, the printed times are rounded to 4 decimals
    assert 0 < parts <= row["ours"] + 1e-3 and row["ratio"] == pytest.approx(row["baseline"] / row["ours"], abs=1e-3)
    assert row["generated_tokens"] > 0


def test_bench_weight_sync(cli_rows):
    (row,) = cli_rows["weight-sync"]
    assert row["bench"] == "weight-sync" and row["devices"] == 2 and row["ours"] > 0 and row["baseline"] > 0
    assert row["ratio"] > 0 and "seconds" in row["unit"]
