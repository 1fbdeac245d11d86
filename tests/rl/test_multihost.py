"""Multi-host RL, proven with local processes (slow): 2 processes x 2 fake CPU devices, started by
`launch/local_cpu.sh` (jax.distributed over loopback), run 3 SOD steps with the local sandbox and
match a 1-process x 4-device run of the same global batch and seeds: every step's metrics and the
final params. Each process samples on its own devices (host-local engine); the rows meet in the
one global update."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from support.rl_run import build_rl_run

pytestmark = pytest.mark.slow

OVERRIDES = ["algo.name=sod", "train.prompts_per_step=4", "train.total_steps=3", "train.eval_every=3",
             "checkpoint.save_every=3", "checkpoint.async_save=false", "mesh.data=1", "mesh.fsdp=-1",
             "mesh.tensor=1", "sandbox.workers=1", "reward.workers=1"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(m: dict) -> dict:
    """A step's figures without wall-clock ones and compile counts (they differ between layouts)."""
    return {k: v for k, v in m.items() if not (k.startswith(("time/", "compile", "startup_compile")) or "per_s" in k
                                               or k in ("checkpoint_blocking_s", "update_tokens_per_s"))}


def _final_params(run: Path) -> dict:
    from safetensors.numpy import load_file

    out = run.parent / (run.name + "_hf")
    subprocess.run([sys.executable, "-m", "sod_jax.convert", "orbax-to-hf", "--ckpt", str(run / "checkpoints"),
                    "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=600)
    params = {}
    for f in sorted(out.glob("*.safetensors")):
        params.update(load_file(f))
    return params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, base, _ = build_rl_run(tmp_path_factory.mktemp("multihost"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM"))}
    one = root / "one"
    p = subprocess.run([sys.executable, "-m", "sod_jax.train", "--config", str(base), *OVERRIDES,
                        f"train.out_dir={one}", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert p.returncode == 0, p.stderr[-4000:]
    two = root / "two"
    q = subprocess.run(["bash", str(REPO / "launch" / "local_cpu.sh"), "2", str(base), *OVERRIDES,
                        f"train.out_dir={two}", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=1200, env=dict(env, DEVICES_PER_PROCESS="2", LOG_DIR=str(root / "logs"),
                                              KILL_GRACE_S="5"))
    logs = "".join(f.read_text()[-3000:] for f in sorted((root / "logs").glob("proc_*.log")))
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-2000:] + logs
    return one, two


def test_two_processes_equal_one(runs):
    one, two = runs
    a, b = _records(one / "metrics.jsonl"), _records(two / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        ca, cb = _comparable(ma), _comparable(mb)
        assert set(ca) == set(cb), set(ca) ^ set(cb)
        for k in ca:
            x, y = ca[k], cb[k]
            if isinstance(x, (int, float, list)):  # float rounding of another device layout only
                np.testing.assert_allclose(np.asarray(y, float), np.asarray(x, float), rtol=1e-5, atol=1e-5,
                                           err_msg=f"step {ma['step']} {k}")
            else:
                assert x == y, (ma["step"], k, x, y)
    ea, eb = _records(one / "eval.jsonl"), _records(two / "eval.jsonl")
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [0, 3]
    for x, y in zip(ea, eb):
        assert x["math"]["acc"] == y["math"]["acc"]
        assert abs(x["heldout_kl"] - y["heldout_kl"]) <= 1e-5
    pa, pb = _final_params(one), _final_params(two)
    assert set(pa) == set(pb)
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], atol=1e-5, err_msg=k)


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    """The 2-process run's checkpoint (step 3) and data position continue in a 1-process x 4-device run:
    its step 4 is the step a 1-process run would take after step 3 (same global batch and seeds)."""
    import shutil

    one, two = runs
    base = two.parent / "base.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM"))}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    runs_ = {}
    for name, src in (("from_two", two), ("from_one", one)):
        out = tmp_path / name
        shutil.copytree(src, out)
        p = subprocess.run([sys.executable, "-m", "sod_jax.train", "--config", str(base), *OVERRIDES,
                            "train.total_steps=4", f"train.out_dir={out}", "--no-progress"], cwd=REPO,
                           capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "resumed from checkpoint step 3" in p.stderr
        runs_[name] = _records(out / "metrics.jsonl")[-1]
    a, b = _comparable(runs_["from_one"]), _comparable(runs_["from_two"])
    assert a["step"] == b["step"] == 4
    for k in ("acc", "reward_mean", "response_length_mean", "pg_loss"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(runs, tmp_path):
    """SIGTERM to process 1 alone: both processes agree to stop at the same step boundary, save that
    step and exit 0; the same command resumes both, and the final params equal the straight 2-process
    run's bitwise."""
    import signal
    import time

    one, two = runs
    base = two.parent / "base.yaml"
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM"))}
    env.update(DEVICES_PER_PROCESS="2", LOG_DIR=str(logs), KILL_GRACE_S="5")
    cmd = ["bash", str(REPO / "launch" / "local_cpu.sh"), "2", str(base), *OVERRIDES, f"train.out_dir={out}",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    os.kill(int((logs / "proc_1.pid").read_text()), signal.SIGTERM)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 3, saved  # stopped early, at one agreed step
    assert "SIGTERM received" in (logs / "proc_1.log").read_text()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [m["step"] for m in _records(metrics)] == [1, 2, 3]
    pa, pb = _final_params(two), _final_params(out)
    for k in pa:
        np.testing.assert_array_equal(pb[k], pa[k], err_msg=k)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_process_makes_the_other_exit_non_zero_within_60_s(runs, tmp_path, victim):
    """kill -9 of one process (1, then separately the coordinator, 0) while the other trains: the
    survivor exits non-zero within 60 s with a message naming what it lost, and the checkpoints written
    before stay readable."""
    import signal
    import time

    _, two = runs
    base = two.parent / "base.yaml"
    out = tmp_path / "run"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM"))}
    procs, logs = [], []
    for i in range(2):
        log = open(tmp_path / f"p{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sod_jax.train", "--config", str(base), *OVERRIDES, "train.total_steps=30",
             "checkpoint.save_every=1", "distributed.heartbeat_timeout=20", f"train.out_dir={out}", "--no-progress"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))))
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    text = (tmp_path / f"p{1 - victim}.log").read_text()
    assert rc != 0 and waited < 60, (rc, waited, text[-3000:])
    if victim == 1:
        assert "error: process 0 lost process 1 during a collective" in text, text[-3000:]
    else:  # whichever notices first names process 0 as the lost coordinator: JAX's runtime, which ends the
        # child itself once the coordination service is gone (its parent says so), or a collective of the
        # trainer, whose peer connection resets first (the trainer says so)
        assert (f"error: process 1 lost process 0 (the coordinator at 127.0.0.1:{port}" in text
                or "error: process 1 lost process 0 (it runs the coordination service, which no longer answers) "
                   "during a collective" in text), text[-3000:]
    finalized = _final_params(out)  # the newest finalized checkpoint restores
    assert finalized and all(np.isfinite(v).all() for v in finalized.values())


def test_eval_cli_on_two_processes_equals_one(runs, tmp_path):
    """`python -m sod_jax.eval` on 2 processes: each samples every other prompt, the records are
    gathered, and the summary (avg@k, pass@k, ...) and the generations equal a 1-process eval's."""
    import yaml

    _, two = runs
    root = two.parent
    cfg = {"model": {"path": str(root / "student"), "dtype": "float32", "param_dtype": "float32"},
           "eval": {"files": [str(root / "val.parquet")], "n": 2, "ks": [1, 2], "max_response_length": 40},
           "rollout": {"num_slots": 4, "decode_steps": 8, "prefill_buckets": [512], "max_assistant_turns": 2},
           "data": {"max_prompt_length": 512}, "sandbox": {"workers": 1}, "reward": {"workers": 1}}
    conf = tmp_path / "eval.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM"))}
    a = subprocess.run([sys.executable, "-m", "sod_jax.eval", "--config", str(conf), f"eval.out_dir={tmp_path / 'one'}",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert a.returncode == 0, a.stderr[-3000:]
    b = subprocess.run(["bash", str(REPO / "launch" / "local_cpu.sh"), "2", str(conf),
                        f"eval.out_dir={tmp_path / 'two'}", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(env, MODULE="sod_jax.eval", DEVICES_PER_PROCESS="1",
                                             LOG_DIR=str(tmp_path / "logs")))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert sa["per_source"] == sb["per_source"]
    ga, gb = (_records(tmp_path / d / "generations.jsonl") for d in ("one", "two"))
    assert [(g["prompt_id"], g["sample"], g["response"]) for g in ga] == \
        [(g["prompt_id"], g["sample"], g["response"]) for g in gb]


def test_sft_on_two_processes_equals_one(tmp_path):
    """2 SFT steps on 2 processes x 2 devices (launch/local_cpu.sh) equal 1 process x 4 devices: the
    per-step metrics and the exported weights."""
    import yaml
    from conftest import build_tokenizer
    from safetensors.numpy import load_file
    from support.sft_conversations import make_rows, write_jsonl

    tok = build_tokenizer(tmp_path / "tok", vocab_size=600)
    write_jsonl(tmp_path / "train.jsonl", make_rows(24))
    cfg = {"sft": dict(train_files=[str(tmp_path / "train.jsonl")], tokenizer=str(tok), init="cpu-tiny",
                       init_overrides=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=640),
                       max_length=512, batch_size=4, max_steps=2, epochs=1, lr=1e-3, val_fraction=0.1, eval_every=2),
           "model": dict(dtype="float32", remat="none", logprob_chunk=128),
           "mesh": dict(data=1, fsdp=-1, tensor=1), "checkpoint": dict(save_every=2), "logging": dict(plots=False)}
    conf = tmp_path / "sft.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM"))}
    a = subprocess.run([sys.executable, "-m", "sod_jax.sft", "--config", str(conf), f"sft.out_dir={tmp_path / 'one'}",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert a.returncode == 0, a.stderr[-3000:]
    b = subprocess.run(["bash", str(REPO / "launch" / "local_cpu.sh"), "2", str(conf), f"sft.out_dir={tmp_path / 'two'}",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(env, MODULE="sod_jax.sft", DEVICES_PER_PROCESS="2", LOG_DIR=str(tmp_path / "logs")))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    ma, mb = (_records(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for k, v in _comparable(x).items():
            if isinstance(v, (int, float)):
                np.testing.assert_allclose(y[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    ta, tb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], atol=1e-5, err_msg=k)
