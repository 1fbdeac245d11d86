"""``python -m sod_jax.demo compare`` reads run directories as the RL loop writes them (written here
with sod_jax.tracking.RunDir) and tabulates / plots them."""

import numpy as np

from sod_jax.demo.compare import plot, run_summary, table
from sod_jax.tracking import RunDir


def _run(path, accs, kls, samples):
    rd = RunDir(path, config={"algo": {"name": "x"}})
    for step, (a, kl) in enumerate(zip(accs, kls)):
        summary = {"demo_chain": {"acc": a, "pass@1": a}}
        if kl is not None:
            summary["heldout_kl"] = kl
        rd.log_eval(step * 10, summary)
    rd.log_step_weights(1, samples)
    rd.close()
    return path


def test_summary_table_and_plot(tmp_path):
    samples = [{"row": 0, "reward": 0.0, "tool_errors": 1, "d": [0.1, 0.5, 0.9], "w": [1.0, 0.2, 0.1]},
               {"row": 1, "reward": 1.0, "tool_errors": 0, "d": [0.1, 0.1], "w": [1.0, 1.0]},
               # a demo_chain sample: the first tool output is right (x1 = 863), the second wrong (x2 is
               # 1380, not 1381), the last turn answers without a call
               {"row": 2, "reward": -1.0, "tool_errors": 0, "d": [0.1, 0.5, 0.01], "w": [1.0, 0.2, 1.2],
                "prompt": "x1 = 592+271\nx2 = x1+517\nFind x2.", "tool_outputs": ["863", "1381", None]}]
    runs = {"sod": [run_summary(_run(tmp_path / f"sod{s}", [0.2, 0.3 + s / 10], [0.5, 0.2 + s / 10], samples))
                    for s in range(2)],
            "grpo": [run_summary(_run(tmp_path / "grpo0", [0.2, 0.25], [None, None], []))]}
    s0 = runs["sod"][0]
    assert s0["acc_before"] == 0.2 and s0["acc_after"] == 0.3 and s0["kl_final"] == 0.2
    assert s0["curve"] == [(0, 0.2), (10, 0.3)]
    # the wrong step: turn 2 of the demo_chain sample (w 0.2); correct tool steps (turn 1 aside, whose
    # w is 1 by definition): the clean trajectory's turn 2 (1.0); after the wrong step: the answer turn
    # of the demo_chain sample (1.2) and every later turn of the tool-error trajectory (0.2, 0.1)
    assert np.isclose(s0["w_failed_tool_step"], 0.2) and s0["failed_tool_steps"] == 1
    assert np.isclose(s0["w_correct_tool_step"], 1.0)
    assert np.isclose(s0["w_after_failed_tool"], np.mean([0.2, 0.1, 1.2]))
    md = table(runs)
    sod_row = [line for line in md.splitlines() if line.startswith("| sod |")][0]
    assert f"{np.mean([0.3, 0.4]):.3f} ± {np.std([0.3, 0.4], ddof=1):.3f}" in sod_row
    grpo_row = [line for line in md.splitlines() if line.startswith("| grpo |")][0]
    assert "| 0.250 | — |" in grpo_row  # no teacher, no KL
    png = plot(runs, tmp_path / "acc.png")
    assert png.stat().st_size > 1000
