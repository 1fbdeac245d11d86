"""The bench CLI prints JSON lines in the documented shape (no timing assertions)."""

import json
import subprocess
import sys


def test_bench_memory_prints_json_lines():
    out = subprocess.run([sys.executable, "-m", "sod_jax.bench", "memory"], capture_output=True, text=True,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["mode"] for r in rows] == ["forward", "value_and_grad"]
    for r in rows:
        assert {"bench", "ours", "baseline", "ratio"} <= set(r) and r["bench"] == "memory"
        assert (r["T"], r["V"]) == (8192, 151936)
        assert r["ours_over_one_fp32_TxV"] < 1 / 8
        assert r["ratio"] == round(r["ours"] / r["baseline"], 5)
