"""scripts/plan_table.py's resume rules (the script itself compiles the paper's programs for
minutes each, so it is not run here): a stored probe is read back, a probe whose child died is
retried only under a larger heap cap, and a row that is done drops the error of an earlier run."""

import importlib.util
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plan_table.py"


@pytest.fixture(scope="module")
def pt():
    spec = importlib.util.spec_from_file_location("plan_table_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(pt, tmp_path, probes, heap):
    rows = {"0.6b/v4-32": {"probes": dict(probes)}}
    return pt.Row("0.6b/v4-32", rows, tmp_path / "t.json", SimpleNamespace(host_memory_gb=heap)), rows


def test_died_probe_is_retried_only_under_a_larger_heap(pt, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):  # a child killed by a signal, as the heap cap kills it
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, -11, stdout="", stderr="compiling rollouts\n")

    monkeypatch.setattr(pt.subprocess, "run", fake_run)
    died = {"rollouts:16:32": {"died": True, "fits": False, "heap_gb": 14.0}}
    row, _ = _row(pt, tmp_path, died, 14.0)
    assert row.probe("rollouts", 16, 32) is None and calls == []  # same cap: not compiled again

    row, rows = _row(pt, tmp_path, died, 18.0)
    assert row.probe("rollouts", 16, 32) is None and len(calls) == 1  # larger cap: compiled again
    stored = pt.load(tmp_path / "t.json")["0.6b/v4-32"]["probes"]["rollouts:16:32"]
    assert stored["died"] and stored["heap_gb"] == 18.0 and stored["returncode"] == -11

    row, _ = _row(pt, tmp_path, {"rollouts:16:32": {"died": True, "fits": False}}, 14.0)  # written before heap_gb
    row.probe("rollouts", 16, 32)
    assert len(calls) == 2

    ok = {"update:16:32": {"fits": True, "resident": 1, "verdict": "fits"}}
    row, _ = _row(pt, tmp_path, ok, 14.0)
    assert row.probe("update", 16, 32) == ok["update:16:32"] and len(calls) == 2


def test_a_row_done_now_drops_an_earlier_error(pt, tmp_path, monkeypatch):
    out = tmp_path / "t.json"
    pt.save(out, {"0.6b/v4-32": {"status": "error", "error": "RuntimeError: child died", "trace": "...",
                                 "probes": {}}})

    def run(self):
        self.data.update(status="done", method="compiled", micro_batch_size=64, num_slots=40)

    monkeypatch.setattr(pt.Row, "run", run)
    monkeypatch.setattr("sys.argv", ["plan_table.py", "--out", str(out), "--rows", "0.6b/v4-32"])
    monkeypatch.setattr(pt, "markdown", lambda rows: "")
    assert pt.main() == 0
    r = pt.load(out)["0.6b/v4-32"]
    assert r["status"] == "done" and "error" not in r and "trace" not in r
