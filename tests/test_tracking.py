"""Run-directory writers and plots drawn from the jsonl files alone."""

import subprocess
import sys

import numpy as np

from sod_jax.tracking import RunDir, read_jsonl


def _fill(run: RunDir, steps: int = 6) -> None:
    for s in range(1, steps + 1):
        run.log_metrics(s, {"reward_mean": np.float32(s / 10), "acc": s / 12, "kl_k1": 1.0 / s, "kl_k3": 0.5 / s,
                            "response_length_mean": 100 + s, "turns_mean": 2.0, "tool_calls_mean": 1.5,
                            "tool_error_rate": 0.1, "step_w_mean_by_k": np.array([1.1, 0.9, 0.7]),
                            "step_d_mean_by_k": [0.2, 0.3, 0.4], "step_count_by_k": [5, 3, 0],
                            "nan_metric": float("nan")})
        if s % 3 == 0:
            run.log_eval(s, {"demo_chain": {"acc": s / 10, "pass@4": 0.5}})
        run.log_step_weights(s, [{"d": [0.1, 0.2], "w": [1.0, 0.5]}])


def test_jsonl_records_truncation_and_torn_lines(tmp_path):
    run = RunDir(tmp_path / "run")
    _fill(run)
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(recs[0]["step_w_mean_by_k"], [1.1, 0.9, 0.7])
    assert isinstance(recs[0]["reward_mean"], float)
    assert recs[0]["nan_metric"] is None  # NaN is not JSON; written as null
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "reward')  # a run killed mid-write
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 6
    run.truncate_after(4)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "eval.jsonl")] == [3]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "step_weights.jsonl")] == [1, 2, 3, 4]


def test_disabled_writer_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "other", enabled=False)
    _fill(run, 2)
    assert not (tmp_path / "other").exists()


def test_plot_cli_regenerates_pngs_from_jsonl(tmp_path):
    run = RunDir(tmp_path / "run")
    _fill(run)
    out = subprocess.run([sys.executable, "-m", "sod_jax.tracking", "plot", str(tmp_path / "run")],
                         capture_output=True, text=True, check=True).stdout.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in out)
    assert names == ["eval_acc.png", "kl.png", "length.png", "reward.png", "step_weights.png", "turns.png"]
    for p in out:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000  # a real picture, not an empty canvas
    bad = subprocess.run([sys.executable, "-m", "sod_jax.tracking", "plot", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "holds no metrics.jsonl" in bad.stderr
