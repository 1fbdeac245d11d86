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
