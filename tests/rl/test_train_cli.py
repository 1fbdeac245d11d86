"""`python -m sod_jax.train` end to end on tiny random student/teacher checkpoints, fixture parquet
and the local sandbox: every algorithm runs, writes the run directory with finite metrics, compiles
the update at most once per length bucket, resumes, and fails early with a message on bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, make_hf_model
from support.rl_run import QUESTIONS, _rows, _write_parquet, build_rl_run

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_rl_run(tmp_path_factory.mktemp("train_cli"))


def run_cli(*args, env=None, check=True):
    e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "sod_jax.train", *args, "--no-progress"], capture_output=True,
                       text=True, cwd=REPO, env=e, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"train exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}")
    return p


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("algo", ["grpo", "opd", "sod", "gated_opd", "opsd_gt", "iw_opd"])
def test_each_algorithm_runs_three_steps(setup, algo):
    root, base, _ = setup
    out = root / f"run_{algo}"
    p = run_cli("--config", str(base), f"algo.name={algo}", f"train.out_dir={out}")
    assert "held-out math accuracy after" in p.stdout
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl"):
        assert (out / name).is_file(), name
    metrics = _records(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in ("pg_loss", "reward_mean", "grad_norm", "response_length_mean", "turns_mean", "acc",
                    "time/rollout", "time/update", "sampler_trainer_logp_absdiff", "compiles", "compile_s"):
            assert key in m and m[key] is not None and math.isfinite(m[key]), (algo, key, m.get(key))
        # Engine log-probs and the trainer's old log-probs of the same tokens agree (fp32).
        assert m["sampler_trainer_logp_absdiff"] < 1e-4
        # At most one compile per length bucket.
        assert m["update_compiles"] <= 2
    if algo in ("opd", "sod", "gated_opd", "iw_opd"):
        assert all("kl_k1" in m for m in metrics)
    evals = _records(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3] and "acc" in evals[-1]["math"]
    assert (out / "checkpoints").is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text())["algo"]["name"] == algo
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "reward.png" in pngs and "eval_acc.png" in pngs
    if algo == "sod":
        assert "step_weights.png" in pngs
        sw = _records(out / "step_weights.jsonl")
        assert sw and all(len(t["d"]) == len(t["w"]) for r in sw for t in r["trajectories"])


def test_warm_up_compiles_every_program_before_step_1(setup, tmp_path):
    """compile.warmup: every program of the run (engine phases, update and held-out KL per length bucket)
    compiles before step 1, so the steps (rollouts with tool calls, updates, the step-3 eval, checkpoints)
    compile nothing, as JAX's own compile events count them. A second run of the same command with
    the same persistent cache loads every program from it: no cache miss."""
    root, base, _ = setup
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")}
    starts = []
    for i in range(2):
        out = root / f"run_warm_{i}"
        t0 = time.perf_counter()
        p = run_cli("--config", str(base), "algo.name=sod", "compile.warmup=true", f"train.out_dir={out}", env=env)
        starts.append(time.perf_counter() - t0)
        assert "warm-up: compiled" in p.stdout + p.stderr
        metrics = _records(out / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert max(m["num_tool_calls_mean"] if "num_tool_calls_mean" in m else 0 for m in metrics) >= 0
        for m in metrics:
            assert m["compiles"] == 0, (i, m["step"], m["compiles"])
        first = metrics[0]
        assert first["startup_compiles"] > 10
        if i == 0:
            assert first["startup_compile_cache_misses"] > 10
        else:
            assert first["startup_compile_cache_misses"] == 0 and first["startup_compile_cache_hits"] > 10
    print(f"warm-up runs: first {starts[0]:.0f} s, second (persistent cache) {starts[1]:.0f} s")


def _final_params(run: Path) -> dict:
    """The run's latest checkpoint exported by `python -m sod_jax.convert orbax-to-hf` (numpy arrays)."""
    from safetensors.numpy import load_file

    out = run.parent / (run.name + "_hf")
    subprocess.run([sys.executable, "-m", "sod_jax.convert", "orbax-to-hf", "--ckpt", str(run / "checkpoints"),
                    "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=600)
    params = {}
    for f in sorted(out.glob("*.safetensors")):
        params.update(load_file(f))
    return params


def _comparable(m: dict) -> dict:
    """A step's metrics without the wall-clock ones and the compilation counts (a resumed process
    compiles its programs again, at other steps than a straight run)."""
    return {k: v for k, v in m.items() if not (k.startswith(("time/", "compile", "startup_compile")) or "per_s" in k
                                               or k == "checkpoint_blocking_s")}


def _interrupted(args: list, out: Path, how: str) -> str:
    """Start the run, interrupt it once ``metrics.jsonl`` has 3 steps (SIGTERM or kill -9), return its output."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen([sys.executable, "-m", "sod_jax.train", *args, "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= (1 if how == "sigterm" else 3):
            break
        time.sleep(0.2)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.kill()
    text, _ = proc.communicate(timeout=600)
    if how == "sigterm":
        assert proc.returncode == 0, text[-3000:]
        assert "stopping at step" in text
    return text


def test_resume_is_exact_after_sigterm_and_kill_9(setup):
    """4 steps straight vs (SIGTERM at a step boundary | kill -9 mid-run after the step-2 checkpoint)
    + the same command again: the same per-step metrics (every value equal, wall-clock aside) and
    bitwise-identical final params: the data order, the sampling streams, the rewards and the
    updates all continue exactly."""
    root, base, _ = setup

    def args(out):
        return ["--config", str(base), "algo.name=sod", f"train.out_dir={out}", "train.total_steps=4",
                "train.eval_every=0", "checkpoint.save_every=2"]

    straight = root / "run_straight"
    run_cli(*args(straight))
    ref = [_comparable(m) for m in _records(straight / "metrics.jsonl")]
    assert [m["step"] for m in ref] == [1, 2, 3, 4]
    ref_params = _final_params(straight)
    for how in ("sigterm", "kill9"):
        out = root / f"run_{how}"
        _interrupted(args(out), out, how)
        first = _records(out / "metrics.jsonl")
        assert 1 <= len(first) < 4 or how == "kill9", first
        run_cli(*args(out))  # the same command resumes from the latest complete checkpoint
        got = [_comparable(m) for m in _records(out / "metrics.jsonl")]
        assert [m["step"] for m in got] == [1, 2, 3, 4], how
        assert got == ref, how
        params = _final_params(out)
        assert params.keys() == ref_params.keys()
        for k in ref_params:
            assert np.array_equal(params[k], ref_params[k]), (how, k)


def test_opd_and_sod_lower_heldout_kl(setup):
    root, base, _ = setup
    for algo in ("opd", "sod"):
        out = root / f"kl_{algo}"
        run_cli("--config", str(base), f"algo.name={algo}", f"train.out_dir={out}", "train.total_steps=20",
                "train.eval_every=20", "checkpoint.save_every=100", "algo.grpo_term=false", "optim.lr=1e-2",
                "rollout.n=8", "rollout.num_slots=16", "train.prompts_per_step=4")
        evals = _records(out / "eval.jsonl")
        before, after = evals[0]["heldout_kl"], evals[-1]["heldout_kl"]
        assert after < 0.7 * before, (algo, before, after)


@pytest.mark.parametrize("override, message", [
    ("model.path=/nonexistent/student", "model.path"),
    ("teacher.path=null", "needs a teacher"),
    ("data.train_files=[/nonexistent/train.parquet]", "does not exist"),
])
def test_bad_inputs_fail_before_compute(setup, override, message):
    root, base, _ = setup
    p = run_cli("--config", str(base), override, f"train.out_dir={root / 'bad'}", check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Compiling" not in p.stderr


def test_teacher_with_another_vocabulary_is_refused(setup):
    root, base, dirs = setup
    other = root / "teacher_other_vocab"
    if not other.exists():
        m = make_hf_model(seed=3, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
        m.save_pretrained(other)
    p = run_cli("--config", str(base), f"teacher.path={other}", f"train.out_dir={root / 'bad'}", check=False)
    assert p.returncode == 2 and "vocab mismatch" in p.stderr, p.stderr[-2000:]


def test_unknown_data_source_is_refused(setup):
    root, base, _ = setup
    bad = _write_parquet(root / "unknown_source.parquet", _rows(QUESTIONS[:4], source="no_such_source"))
    p = run_cli("--config", str(base), f"data.train_files=[{bad}]", f"train.out_dir={root / 'bad'}", check=False)
    assert p.returncode == 2 and "no_such_source" in p.stderr, p.stderr[-2000:]


def test_sandbox_that_cannot_isolate_is_refused(setup, tmp_path):
    root, base, _ = setup
    bin_dir = tmp_path / "bin"  # a PATH without bubblewrap
    bin_dir.mkdir()
    p = run_cli("--config", str(base), f"train.out_dir={root / 'bad'}", check=False, env={"PATH": str(bin_dir)})
    assert p.returncode == 2 and "sandbox" in p.stderr and "isolation" in p.stderr, p.stderr[-2000:]
