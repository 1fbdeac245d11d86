"""Exact SFT resume through the CLI: 6 steps straight equal 3 steps + kill -9 (or SIGTERM) + resume
+ 3 steps, bitwise on every parameter and optimizer-state leaf and on every per-step metric."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import build_tokenizer
from support.sft_conversations import make_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]

CHILD = Path(__file__).with_name("sft_child.py")
TIMING_KEYS = {"tokens_per_s", "checkpoint_blocking_s"}  # wall-clock figures differ run to run

pytestmark = pytest.mark.slow


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's run
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_resume")
    tok = build_tokenizer(root / "tok", vocab_size=600)
    write_jsonl(root / "train.jsonl", make_rows(24))
    base = {
        "sft": dict(train_files=[str(root / "train.jsonl")], tokenizer=str(tok), init="cpu-tiny",
                    init_overrides=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=640),
                    max_length=512, batch_size=4, max_steps=6, epochs=2, lr=1e-3, val_fraction=0.1, eval_every=3,
                    early_stop_patience=50),
        "model": dict(dtype="float32", remat="none", logprob_chunk=128),
        "mesh": dict(fsdp=1),
        "checkpoint": dict(save_every=3, keep=2),
        "logging": dict(plots=False),
    }

    def config(name: str) -> Path:
        d = json.loads(json.dumps(base))
        d["sft"]["out_dir"] = str(root / name)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    env = _env(root / "jax_cache")
    straight = config("straight")
    _cli(straight, env)
    return root, config, env


def _cli(config: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "sod_jax.sft", "--config", str(config), "--no-progress"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _metrics(run_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def _final_state(run_dir: Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "6" / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys() and len(sa) > 20
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), f"{k} differs after resume"
    from safetensors.numpy import load_file

    ta, tb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].tobytes() == tb[k].tobytes(), f"exported tensor {k} differs after resume"
    ma, mb = _metrics(a), _metrics(b)
    assert {r["step"] for r in ma if "loss" in r} == {1, 2, 3, 4, 5, 6}
    assert {r["step"] for r in ma if "val_loss" in r} >= {3, 6}  # held-out evaluations continue too
    assert ma == mb


def test_kill9_then_resume_is_exact(setup):
    root, config, env = setup
    cfg = config("killed")
    p = subprocess.run([sys.executable, str(CHILD), str(cfg), "kill9", "5"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    run = root / "killed"
    assert (run / "checkpoints" / "3").is_dir() and not (run / "model").exists()
    assert max(r["step"] for r in _metrics(run)) >= 4  # records past the checkpoint exist and must go
    resumed = _cli(cfg, env)
    assert "resumed SFT from checkpoint step 3" in resumed.stderr
    _assert_same_run(root / "straight", run)


def test_sigterm_saves_exits_0_and_resumes_exactly(setup):
    root, config, env = setup
    cfg = config("sigterm")
    p = subprocess.run([sys.executable, str(CHILD), str(cfg), "sigterm", "3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SIGTERM received" in p.stderr
    run = root / "sigterm"
    steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [3] and not (run / "model").exists()  # stopped at the boundary, no final export
    resumed = _cli(cfg, env)
    assert "resumed SFT from checkpoint step 3" in resumed.stderr
    _assert_same_run(root / "straight", run)
