"""Multi-host start-up (parallel.start_distributed) and the step's split checks (issue #25)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from sod_jax import parallel
from sod_jax.rl.trainer import step_split_problem

REPO = str(Path(__file__).resolve().parents[1])
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, kind, n", [
    ({}, None, None),
    ({**SLURM, "SLURM_NTASKS": "1"}, None, None),
    ({**SLURM, "SLURM_NTASKS": "2"}, "slurm", 2),
    ({"SLURM_NTASKS": "4"}, None, None),  # not under srun: jax could not start it either
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, "jax-env", 4),
    ({"JAX_NUM_PROCESSES": "1"}, None, None),
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, "tpu", 4),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None, None),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "MEGASCALE_NUM_SLICES": "2"}, "tpu", 4),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h:8080"}, "tpu", None),
])
def test_detect_cluster(env, kind, n):
    found = parallel.detect_cluster(env)
    assert (found and found["kind"]) == kind or (found is None and kind is None)
    if found:
        assert found["num_processes"] == n and found["vars"]


@pytest.fixture
def fake_jax(monkeypatch):
    """jax.distributed.initialize recorded, not run; the process count stays 1."""
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel, "_jax_tpu_vm_process_count", lambda: None)

    def initialize(coordinator_address=None, num_processes=None, process_id=None, initialization_timeout=300,
                   heartbeat_timeout_seconds=100, shutdown_timeout_seconds=300):
        calls.append(dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                          initialization_timeout=initialization_timeout))

    monkeypatch.setattr(parallel.jax.distributed, "initialize", initialize)
    return calls


def test_single_process_does_not_initialize(fake_jax):
    assert parallel.start_distributed(None, env={})["initialized"] is False
    assert parallel.start_distributed(SimpleNamespace(num_processes=1), env={**SLURM, "SLURM_NTASKS": "2"})[
        "initialized"] is False
    assert fake_jax == []


def test_cluster_vars_but_one_process_is_loud(fake_jax):
    env = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    cfg = SimpleNamespace(coordinator=None, num_processes=None, process_id=None, initialization_timeout=7,
                          heartbeat_timeout=5, shutdown_timeout=5)
    with pytest.raises(parallel.DistributedStartupError, match=r"JAX_COORDINATOR_ADDRESS.*process_count\(\) == 1") as e:
        parallel.start_distributed(cfg, env=env)
    assert "\n" not in str(e.value)
    assert fake_jax == [dict(coordinator_address=None, num_processes=2, process_id=1, initialization_timeout=7)]
    with pytest.raises(parallel.DistributedStartupError, match="SLURM_NTASKS"):
        parallel.start_distributed(None, env={**SLURM, "SLURM_NTASKS": "2"})


def test_explicit_keys_win(fake_jax):
    cfg = SimpleNamespace(coordinator="c:1", num_processes=3, process_id=2)
    with pytest.raises(parallel.DistributedStartupError, match="distributed.num_processes"):
        parallel.start_distributed(cfg, env={"JAX_NUM_PROCESSES": "5", "JAX_PROCESS_ID": "0"})
    assert fake_jax[0]["num_processes"] == 3 and fake_jax[0]["process_id"] == 2


def test_already_initialized_is_a_no_op(fake_jax, monkeypatch):
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: True)
    assert parallel.start_distributed(None, env={**SLURM, "SLURM_NTASKS": "2"})["initialized"] is False
    assert fake_jax == []


def test_step_split_problems():
    assert step_split_problem(64, 16, 4, 1) is None
    assert step_split_problem(64, 16, 4, 4, 8) is None
    assert step_split_problem(2, 4, 2, 1) is None
    msg = step_split_problem(6, 16, 4, 4)
    assert "train.prompts_per_step (6)" in msg and "process count (4)" in msg
    assert "train.mini_batches (3)" in step_split_problem(4, 2, 3, 1)
    msg = step_split_problem(4, 3, 2, 2, 8)
    assert "mesh.data x mesh.fsdp = 8" in msg and "4 * 3 = 12" in msg
    assert step_split_problem(4, 3, 2, 1, 8) is None  # one process: the axis is replicated instead


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_local_processes_join_one_run(tmp_path):
    script = tmp_path / "start.py"
    script.write_text(textwrap.dedent("""
        from types import SimpleNamespace
        import jax
        from sod_jax import parallel
        cfg = SimpleNamespace(coordinator=None, num_processes=None, process_id=None,
                              initialization_timeout=30, heartbeat_timeout=10, shutdown_timeout=10)
        parallel.start_distributed(cfg)
        parallel.start_distributed(cfg)  # idempotent
        print("RESULT", jax.process_count(), jax.process_index(), flush=True)
    """))
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=60)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2, outs
    assert {r[0] for r in results} == {"2"}
    assert {r[1] for r in results} == {"0", "1"}


def test_joins_cluster_makes_start_distributeds_decision(fake_jax):
    assert not parallel.joins_cluster(None, env={})
    assert parallel.joins_cluster(None, env={**SLURM, "SLURM_NTASKS": "2"})
    assert not parallel.joins_cluster(SimpleNamespace(num_processes=1), env={**SLURM, "SLURM_NTASKS": "2"})
    assert parallel.joins_cluster(SimpleNamespace(num_processes=2), env={})
    assert parallel.joins_cluster(None, env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    assert fake_jax == []  # nothing started


_SUPERVISED = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from sod_jax import supervise
    supervise.cli_module = lambda argv=None: "sod_jax.fake"  # as if run as python -m sod_jax.fake
    out, mode = sys.argv[1], sys.argv[2]
    code = supervise.supervised()
    if code is not None:  # the parent
        sys.exit(code)
    supervise.child_started()
    supervise.child_joined(1, sys.argv[3])
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    open(os.path.join(out, "child.pid"), "w").write(str(os.getpid()))
    if mode == "abort":
        os.abort()  # as JAX's runtime does when the coordination service is gone
    deadline = time.time() + 30
    while time.time() < deadline and not got:
        time.sleep(0.05)
    time.sleep(0.5)  # a second, duplicated signal would arrive now
    open(os.path.join(out, "signals"), "w").write(str(len(got)))
    sys.exit(0 if got else 5)
""")


def test_supervisor_names_a_lost_coordinator_forwards_signals_once_and_takes_the_child_with_it(tmp_path):
    """The parent of a multi-process job (sod_jax.supervise): a child ended by abort() while process 0's
    address no longer answers gets one line naming process 0; an abort with the coordinator still up is
    reported as such; SIGTERM to the parent reaches the child once; kill -9 of the parent kills the child."""
    import signal
    import time

    script = tmp_path / "job.py"
    script.write_text(_SUPERVISED.format(repo=REPO))
    dead = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOD_JAX_SUPERVIS")}

    def run(mode, address, out):
        out.mkdir()
        return subprocess.Popen([sys.executable, str(script), str(out), mode, address], env=env,
                                stderr=subprocess.PIPE, text=True)

    p = run("abort", dead, tmp_path / "a")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert f"error: process 1 lost process 0 (the coordinator at {dead}" in err and "SIGABRT" in err, err

    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        p = run("abort", f"127.0.0.1:{live.getsockname()[1]}", tmp_path / "b")
        _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGABRT and "error: process 1 was ended by SIGABRT" in err, err

    out = tmp_path / "c"
    p = run("wait", dead, out)
    while not (out / "child.pid").exists():
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0
    assert (out / "signals").read_text() == "1"

    out = tmp_path / "d"
    p = run("wait", dead, out)
    while not (out / "child.pid").exists():
        time.sleep(0.05)
    child = int((out / "child.pid").read_text())
    p.kill()
    p.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child outlived its killed parent")
