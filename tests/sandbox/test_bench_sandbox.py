"""`bench sandbox` prints its rows in the documented shape (no timing assertions)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_sandbox_rows():
    out = subprocess.run([sys.executable, "-m", "sod_jax.bench", "sandbox", "--runs", "6", "--concurrency", "2",
                          "--server-concurrency", "1,2", "--rounds", "2", "--no-progress"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["backend"], r["mode"], r["concurrency"]) for r in rows] == [
        ("local", "warm", 2), ("local", "cold", 2), ("server", "warm", 1), ("server", "warm", 2)]
    assert [r["baseline_name"] for r in rows] == ["cold", "bare subprocess", "bare subprocess", "bare subprocess"]
    for r in rows:
        assert r["bench"] == "sandbox" and r["unit"] == "executions/s" and r["runs"] == 6 and r["confined"] is True
        assert r["ours"] > 0 and r["baseline"] > 0 and abs(r["ratio"] - r["ours"] / r["baseline"]) < 0.01 * r["ratio"] + 0.01
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["baseline_p99_ms"] >= r["baseline_p50_ms"] > 0
    assert rows[0]["baseline"] == rows[1]["ours"]  # warm's baseline is the cold executor measured alongside
