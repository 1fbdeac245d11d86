"""python -m sod_jax.eval end to end: a tiny model (memorised tool-using answers, trained with our SFT)
on math and code rows, tool calls and code tests executed in the local sandbox; a SIGKILLed and
restarted eval keeps its finished prompts and ends with the uninterrupted run's summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.eval_fixtures import eval_rows, train_memorised_model

REPO = Path(__file__).resolve().parents[2]
N = 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("eval_e2e")
    model_dir, loss = train_memorised_model(d / "sft", tokenizer_dir, steps=80)
    assert loss < 0.05
    data = d / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in eval_rows()))
    return d, model_dir, data


def args(model_dir, data, out):
    return ["--model", str(model_dir), "--files", str(data), "--n", str(N), "--out", str(out), "--no-progress",
            "model.dtype=float32", "eval.chunk_prompts=1", "eval.max_response_length=256", "rollout.num_slots=4",
            "sandbox.workers=2", "sandbox.run_timeout=60", "reward.workers=1"]


def records(path: Path) -> dict:
    return {(r["prompt_id"], r["sample"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_eval_end_to_end_and_sigkill_resume(setup):
    from sod_jax.eval import main

    d, model_dir, data = setup
    # 1) uninterrupted
    assert main(args(model_dir, data, d / "full")) == 0
    full = json.loads((d / "full" / "summary.json").read_text())
    assert (d / "full" / "summary.md").is_file() and len(records(d / "full" / "generations.jsonl")) == 4 * N
    math, code = full["per_source"]["AIME2024"], full["per_source"]["LiveCodeBench_v6"]
    assert math["prompts"] == 2 and code["prompts"] == 2 and math["n"] == N
    # the memorised answers: a tool call each (run in the sandbox), then \boxed{} / a program that passes
    assert math["tool_calls_mean"] >= 0.9 and code["tool_calls_mean"] >= 0.9
    assert math["acc"] >= 0.5 and code["acc"] >= 0.5
    rec = records(d / "full" / "generations.jsonl")
    assert any("<tool_response>\n42" in r["response"] for r in rec.values())
    assert all(r["pred"].startswith("n = int(input())") for r in rec.values() if r["data_source"] == "LiveCodeBench_v6" and r["acc"])

    # 2) killed after its first prompt is on disk
    out = d / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "sod_jax.eval", *args(model_dir, data, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gen = out / "generations.jsonl"
    t0 = time.time()
    while time.time() - t0 < 600 and proc.poll() is None:
        if gen.is_file() and len(gen.read_text().splitlines()) >= N:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    kept = gen.read_text().splitlines()
    finished = len(kept) // N
    assert 1 <= finished < 4, "the eval was not interrupted mid-run"
    assert not (out / "summary.json").exists()

    # 3) restarted: finished prompts are kept as they are, the rest generated; same summary
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{finished} of 4 prompts already generated" in p.stderr
    assert gen.read_text().splitlines()[:finished * N] == kept[:finished * N]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["per_source"] == full["per_source"] and resumed["verl"] == full["verl"]
    again = records(gen)
    assert again.keys() == rec.keys()
    assert all(again[k]["response"] == rec[k]["response"] and again[k]["acc"] == rec[k]["acc"] for k in rec)
