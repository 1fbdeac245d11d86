"""PreemptionGuard in a real process: one SIGTERM -> save at the step boundary, exit 0; a second
signal -> exit at once (143) and every finalized checkpoint still restores."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sod_jax.checkpoint import Checkpointer, PreemptionGuard

REPO = Path(__file__).resolve().parents[2]

LOOP = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from sod_jax.checkpoint import Checkpointer, PreemptionGuard
    ckpt = Checkpointer(sys.argv[1], save_every=int(sys.argv[2]), keep=100)
    honour = sys.argv[3] == "honour"  # else: a long step that never reaches its boundary
    with PreemptionGuard() as guard:
        step = 0
        while True:
            step += 1
            state = {"w": jnp.full((1024, 1024, 4), float(step)), "step": jnp.int32(step)}  # 16 MiB
            # as the RL and SFT loops do: decide first, then save (forced when stopping), then stop
            stop = honour and guard.stop_now()
            ckpt.save(step, state, extra={"step": step}, force=stop or guard.requested)
            if step == 1:
                ckpt.wait()
                print("ready", flush=True)
            if stop:
                print(f"stopped after step {step}", flush=True)
                break
            time.sleep(0.02)
    ckpt.close()
""")


def _start(directory: Path, save_every: int, honour: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", LOOP, str(directory), str(save_every),
                          "honour" if honour else "ignore"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _restore(directory: Path):
    target = {"w": jnp.zeros((1024, 1024, 4)), "step": jnp.int32(0)}
    return Checkpointer(directory, save_every=1, keep=100).restore(target)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_0(tmp_path):
    p = _start(tmp_path, save_every=1000)  # no periodic saves after step 1: only the preemption save
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    last = int(out.split("stopped after step ")[1])
    assert "SIGTERM received" in err
    step, state, extra = _restore(tmp_path)
    assert step == last and extra == {"step": last} and int(state["step"]) == last
    np.testing.assert_array_equal(np.asarray(state["w"][0, 0]), np.full(4, float(last)))


@pytest.mark.slow
def test_second_signal_exits_at_once_leaving_checkpoints_valid(tmp_path):
    # a save starts every step (so one is usually in flight) and the step boundary is never reached
    p = _start(tmp_path, save_every=1, honour=False)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    for line in p.stderr:  # wait until the first one was handled (signals of one kind do not queue)
        if "SIGTERM received" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "again: exiting now" in err
    steps = Checkpointer(tmp_path, save_every=1, keep=100).all_steps()
    assert steps and steps[0] == 1
    step, state, extra = _restore(tmp_path)  # the newest finalized one restores without fallback
    assert step == steps[-1] and extra == {"step": step} and float(state["w"][0, 0, 0]) == step


def test_guard_restores_previous_handlers_and_is_inert_off_main_thread():
    import threading

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as g:
        assert signal.getsignal(signal.SIGTERM) == g._handle
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert g.requested and g.signal == signal.SIGTERM and g.stop_now()
    assert signal.getsignal(signal.SIGTERM) == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(PreemptionGuard().__enter__()._previous))
    t.start()
    t.join()
    assert seen == [{}]
