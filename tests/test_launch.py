"""The launchers of ``launch/`` (issue #25) against fakes: shellcheck, ``tpu_vm.sh`` with a fake
``gcloud``, ``slurm.sbatch`` with a fake ``srun``, ``local_cpu.sh`` with a fake interpreter, and the
GKE manifest. No JAX, no network; each test takes seconds."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]

# Records its argv and environment as one JSON line in $FAKE_LOG; FAKE_FAIL_ON=<text>: exit 1 when an
# argument contains <text>.
RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
fail = os.environ.get("FAKE_FAIL_ON")
sys.exit(1 if fail and any(fail in a for a in sys.argv[1:]) else 0)
"""

# Stands in for the interpreter of local_cpu.sh: records argv and the JAX_* / XLA_FLAGS variables of
# process JAX_PROCESS_ID in $FAKE_OUT/rec_<id>.json, then does what FAKE_ACT_<id> says: "exitN" (after
# 0.3 s), "sleepS", or "term0S" (sleep S seconds, exit 0 on SIGTERM); default exit 0.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
i = os.environ.get("JAX_PROCESS_ID", "x")
act = os.environ.get(f"FAKE_ACT_{{i}}", "exit0")
if act.startswith("term0"):
    signal.signal(signal.SIGTERM, lambda *_: (print(f"process {{i}} saved", flush=True), sys.exit(0)))
    act = "sleep" + act[5:]
env = {{k: v for k, v in os.environ.items() if k.startswith("JAX_") or k == "XLA_FLAGS"}}
rec = os.path.join(os.environ["FAKE_OUT"], f"rec_{{i}}.json")
with open(rec + ".tmp", "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": env, "pid": os.getpid()}}, f)
os.replace(rec + ".tmp", rec)
print(f"process {{i}} up", flush=True)
if act.startswith("exit"):
    time.sleep(0.3)
    sys.exit(int(act[4:]))
time.sleep(float(act[5:]))
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _pinned_jax() -> str:
    return re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)


# ------------------------------------------------------------------------------------------------
# shellcheck


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)")
    assert len(SCRIPTS) >= 3, SCRIPTS
    p = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", ["local_cpu.sh", "tpu_vm.sh", "slurm.sbatch"])
def test_scripts_explain_themselves(script):
    p = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "sod_jax" in p.stdout and ("usage" in p.stdout.lower() or "sbatch launch/slurm.sbatch" in p.stdout)


# ------------------------------------------------------------------------------------------------
# tpu_vm.sh against a fake gcloud


def _tpu_vm(tmp_path: Path, *args: str, fail_on: str | None = None, extra_env: dict | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _write_exe(bin_dir / "gcloud", RECORDER)
    log = tmp_path / "gcloud.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
           "STOP_GRACE_S": "5", "START_CHECK_S": "3", **(extra_env or {})}
    env.pop("FAKE_FAIL_ON", None)
    if fail_on:
        env["FAKE_FAIL_ON"] = fail_on
    p = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True, text=True, env=env, timeout=60)
    return p, [r["argv"] for r in _records(log)]


def _ssh_commands(calls: list[list[str]]) -> list[str]:
    """The --command of each `tpu-vm ssh` call, after checking how every call addresses the slice."""
    out = []
    for argv in calls:
        assert argv[:3] == ["compute", "tpus", "tpu-vm"], argv
        assert "my-tpu" in argv or any(a.startswith("my-tpu:") for a in argv), argv
        assert "--zone=us-west4-a" in argv and "--project=my-proj" in argv and "--worker=all" in argv, argv
        if argv[3] == "ssh":
            out.append(next(a[len("--command="):] for a in argv if a.startswith("--command=")))
    return out


def _is_stop(cmd: str) -> bool:
    return "pkill -TERM" in cmd and "pkill -KILL" in cmd and "rm -f /tmp/libtpu_lockfile" in cmd


TPU_ARGS = ("--name", "my-tpu", "--zone", "us-west4-a", "--project", "my-proj", "--env", "WANDB_MODE=offline",
            "configs/sod_qwen3_1.7b.yaml", "train.out_dir=gs://bucket/runs/a b", "train.total_steps=7")


def test_tpu_vm_syncs_installs_and_starts_on_every_worker(tmp_path):
    p, calls = _tpu_vm(tmp_path, *TPU_ARGS)
    assert p.returncode == 0, p.stderr
    cmds = _ssh_commands(calls)
    kinds = [c[3] for c in calls]
    assert kinds == ["ssh", "ssh", "scp", "ssh", "ssh"], kinds
    # 1. stale jobs stopped and the libtpu lock file removed before anything else
    assert _is_stop(cmds[0])
    assert re.search(r"pkill -TERM -f '[^']*sod_jax\[\.\]\(train\|sft\|eval\|generate\)", cmds[0])
    # 2. the checkout copied recursively to every worker
    scp = calls[2]
    assert "--recurse" in scp and any(a.startswith("my-tpu:") for a in scp)
    # 3. the pinned runtime plus the TPU build of the same jax
    install = shlex.split(cmds[2])
    assert "requirements.txt" in install and f"jax[tpu]=={_pinned_jax()}" in install, cmds[2]
    assert install[install.index("pip") + 1:install.index("pip") + 4] == ["install", "-q", "-r"]
    # 4. the job, with the config and the overrides (quoted for the remote shell), detached
    start = cmds[3]
    words = shlex.split(start)
    i = words.index("-m")
    assert words[i + 1:i + 6] == ["sod_jax.train", "--config", "configs/sod_qwen3_1.7b.yaml",
                                  "train.out_dir=gs://bucket/runs/a b", "train.total_steps=7"]
    assert "WANDB_MODE=offline" in words and "nohup" in words
    assert "--stop" in p.stderr and "tail -f" in p.stderr


def test_tpu_vm_failed_start_stops_every_worker(tmp_path):
    p, calls = _tpu_vm(tmp_path, *TPU_ARGS, fail_on="--config")
    assert p.returncode != 0
    cmds = _ssh_commands(calls)
    assert "--config" in cmds[-2] and _is_stop(cmds[-1]), cmds
    assert "stopping it on every worker" in p.stderr


def test_tpu_vm_attached_run_and_stop_only(tmp_path):
    p, calls = _tpu_vm(tmp_path, *TPU_ARGS[:6], "--skip-sync", "--skip-install", "--attach", "--module", "sod_jax.sft",
                       "configs/sft_qwen3_1.7b.yaml")
    assert p.returncode == 0, p.stderr
    cmds = _ssh_commands(calls)
    assert len(cmds) == 2 and _is_stop(cmds[0]) and "scp" not in [c[3] for c in calls]
    assert "exec env" in cmds[1] and "-m sod_jax.sft --config configs/sft_qwen3_1.7b.yaml" in cmds[1]
    assert "nohup" not in cmds[1]

    p, calls = _tpu_vm(tmp_path, *TPU_ARGS[:6], "--stop")
    assert p.returncode == 0, p.stderr
    cmds = _ssh_commands(calls)
    assert len(cmds) == 1 and _is_stop(cmds[0])


def test_tpu_vm_refuses_missing_arguments(tmp_path):
    p, calls = _tpu_vm(tmp_path, "--zone", "z", "c.yaml")
    assert p.returncode == 2 and "--name" in p.stderr and calls == []
    p, calls = _tpu_vm(tmp_path, "--name", "t", "--zone", "z")
    assert p.returncode == 2 and "CONFIG" in p.stderr and calls == []


def test_tpu_vm_stop_pattern_matches_jobs_not_itself():
    """The remote stop finds the training CLIs but not the shell running the stop, nor a sandbox server."""
    text = (LAUNCH / "tpu_vm.sh").read_text()
    pattern = re.search(r"^PATTERN='([^']*)'", text, re.M).group(1)
    stop = re.search(r'^STOP_CMD="(.*?)"$', text, re.M | re.S).group(1).replace("$PATTERN", pattern)
    assert re.search(pattern, "/usr/bin/python3 -m sod_jax.train --config c.yaml")
    assert re.search(pattern, "python3.11 -m sod_jax.eval --config c.yaml")
    assert not re.search(pattern, "python3 -m sod_jax.sandbox serve --port 8080")
    assert not re.search(pattern, f"bash -c {stop}")


# ------------------------------------------------------------------------------------------------
# slurm.sbatch against a fake srun


def test_slurm_sbatch_runs_one_process_per_node_through_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "srun", RECORDER)
    log = tmp_path / "srun.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_SUBMIT_DIR": str(REPO), "CONFIG": "configs/sod_qwen3_0.6b.yaml",
           # a stale launcher's variables must not override SLURM's detection
           "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    p = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "train.total_steps=5", "train.out_dir=/shared/r 1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert p.returncode == 0, p.stderr
    (rec,) = _records(log)
    argv = rec["argv"]
    assert "--ntasks-per-node=1" in argv and "--kill-on-bad-exit=1" in argv
    i = argv.index("-m")
    assert argv[i - 1] == "python"
    assert argv[i + 1:] == ["sod_jax.train", "--config", "configs/sod_qwen3_0.6b.yaml", "train.total_steps=5",
                            "train.out_dir=/shared/r 1"]
    assert rec["env"]["SLURM_JOB_ID"] == "4242"
    assert not any(k in rec["env"] for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    # The batch script's directives: one task per node, GPUs per node, the preemption signal.
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--signal=TERM@"):
        assert f"#SBATCH {directive}" in text

    # The config as the first argument, another module
    log.unlink()
    env.pop("CONFIG")
    p = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "configs/sft_qwen3_0.6b.yaml", "sft.steps=3"],
                       capture_output=True, text=True, env={**env, "MODULE": "sod_jax.sft"}, cwd=tmp_path, timeout=30)
    assert p.returncode == 0, p.stderr
    argv = _records(log)[0]["argv"]
    assert argv[argv.index("-m") + 1:] == ["sod_jax.sft", "--config", "configs/sft_qwen3_0.6b.yaml", "sft.steps=3"]


# ------------------------------------------------------------------------------------------------
# local_cpu.sh against a fake interpreter


def _local(tmp_path: Path, n: int, *overrides: str, acts: dict | None = None, extra_env: dict | None = None,
           wait: bool = True):
    out = tmp_path / "rec"
    out.mkdir(exist_ok=True)
    py = _write_exe(tmp_path / "fake_python", FAKE_PYTHON)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_ACT_")}
    env.update({"PYTHON": str(py), "FAKE_OUT": str(out), "LOG_DIR": str(tmp_path / "logs"), "KILL_GRACE_S": "5",
                **{f"FAKE_ACT_{i}": a for i, a in (acts or {}).items()}, **(extra_env or {})})
    cmd = ["bash", str(LAUNCH / "local_cpu.sh"), str(n), "configs/demo_chain.yaml", *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60), out


def test_local_cpu_starts_n_processes_of_one_cluster(tmp_path):
    flags = "--xla_foo=1 --xla_force_host_platform_device_count=8"
    p, out = _local(tmp_path, 2, "train.total_steps=3", "a.b=with space",
                    extra_env={"DEVICES_PER_PROCESS": "3", "XLA_FLAGS": flags})
    assert p.returncode == 0, p.stderr
    recs = {i: json.loads((out / f"rec_{i}.json").read_text()) for i in (0, 1)}
    assert {r["env"]["JAX_PROCESS_ID"] for r in recs.values()} == {"0", "1"}
    assert {r["env"]["JAX_NUM_PROCESSES"] for r in recs.values()} == {"2"}
    (coordinator,) = {r["env"]["JAX_COORDINATOR_ADDRESS"] for r in recs.values()}
    assert re.fullmatch(r"127\.0\.0\.1:\d+", coordinator)
    for r in recs.values():
        assert r["env"]["JAX_PLATFORMS"] == "cpu"
        assert r["env"]["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=3"]
        assert r["argv"] == ["-m", "sod_jax.train", "--config", "configs/demo_chain.yaml", "train.total_steps=3",
                             "a.b=with space"]
    logs = tmp_path / "logs"
    for i in (0, 1):
        assert (logs / f"proc_{i}.pid").read_text().strip() == str(recs[i]["pid"])
        assert f"process {i} up" in (logs / f"proc_{i}.log").read_text()
        assert f"[p{i}] process {i} up" in p.stdout


def test_local_cpu_one_failure_stops_the_others(tmp_path):
    t0 = time.monotonic()
    p, _ = _local(tmp_path, 2, acts={0: "sleep60", 1: "exit3"})
    took = time.monotonic() - t0
    assert p.returncode == 3, p.stderr
    assert took < 15, took
    assert "process 1 exited with status 3" in p.stderr
    pid0 = int((tmp_path / "logs" / "proc_0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid0, 0)


def test_local_cpu_killed_process_and_forwarded_sigterm(tmp_path):
    # kill -9 of one process by its pid file: the other is stopped, the status is the killed one's
    proc, _ = _local(tmp_path, 2, acts={0: "sleep60", 1: "sleep60"}, wait=False)
    pid_file = tmp_path / "logs" / "proc_1.pid"
    try:
        deadline = time.monotonic() + 20
        while not ((tmp_path / "rec" / "rec_0.json").exists() and (tmp_path / "rec" / "rec_1.json").exists()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGKILL, err
    finally:
        if proc.poll() is None:
            proc.kill()

    # SIGTERM to the launcher reaches every process, which exit 0 (as the training CLIs do)
    shutil.rmtree(tmp_path / "rec")
    proc, _ = _local(tmp_path, 2, acts={0: "term060", 1: "term060"}, wait=False)
    try:
        deadline = time.monotonic() + 20
        while not ((tmp_path / "rec" / "rec_0.json").exists() and (tmp_path / "rec" / "rec_1.json").exists()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "[p0] process 0 saved" in stdout and "[p1] process 1 saved" in stdout
    finally:
        if proc.poll() is None:
            proc.kill()


def test_local_cpu_usage_and_log_dir_from_out_dir(tmp_path):
    p = subprocess.run(["bash", str(LAUNCH / "local_cpu.sh")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "usage: launch/local_cpu.sh N CONFIG" in p.stderr
    p = subprocess.run(["bash", str(LAUNCH / "local_cpu.sh"), "two", "c.yaml"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "positive integer" in p.stderr
    env = {k: v for k, v in os.environ.items() if k != "LOG_DIR"}
    py = _write_exe(tmp_path / "fake_python", FAKE_PYTHON)
    (tmp_path / "rec").mkdir()
    cmd = ["bash", str(LAUNCH / "local_cpu.sh"), "1", "configs/demo_chain.yaml", f"train.out_dir={tmp_path}/run"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                       env={**env, "PYTHON": str(py), "FAKE_OUT": str(tmp_path / "rec")})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "launch_logs" / "proc_0.pid").exists()


# ------------------------------------------------------------------------------------------------
# GKE


def test_gke_jobset_is_one_pod_per_tpu_host():
    doc = yaml.safe_load((LAUNCH / "gke" / "jobset.yaml").read_text())
    assert doc["kind"] == "JobSet" and doc["apiVersion"].startswith("jobset.x-k8s.io/")
    (rj,) = doc["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    pod = job["template"]["spec"]
    hosts = job["parallelism"]
    assert job["completions"] == hosts and hosts > 1
    sel = pod["nodeSelector"]
    # v5e topology AxB = A*B chips over hosts x chips-per-host
    chips = 1
    for d in sel["cloud.google.com/gke-tpu-topology"].split("x"):
        chips *= int(d)
    (container,) = pod["containers"]
    per_host = container["resources"]["limits"]["google.com/tpu"]
    assert container["resources"]["requests"]["google.com/tpu"] == per_host
    assert hosts * per_host == chips
    assert sel["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
    cmd = container["command"]
    assert cmd[:4] == ["python", "-m", "sod_jax.train", "--config"] and (REPO / cmd[4]).exists()
    assert any(a.startswith("train.out_dir=gs://") for a in cmd)
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0


def test_launch_readme_names_every_launcher():
    text = (LAUNCH / "README.md").read_text()
    for name in ("local_cpu.sh", "tpu_vm.sh", "slurm.sbatch", "gke/jobset.yaml", "xpk workload create",
                 "sod_jax.sandbox serve", "Known limits"):
        assert name in text, name
