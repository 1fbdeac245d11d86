"""``python -m sod_jax.demo compare`` reads run directories as the RL loop writes them (written here
with sod_jax.tracking.RunDir) and tabulates / plots them."""

from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# The pre-registered comparison: plan / run / table on synthetic run directories (no training)
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from sod_jax.demo import __main__ as demo_cli  # noqa: E402
from sod_jax.demo import compare, stats, task  # noqa: E402

PROMPT0 = "x1 = 592+271\nx2 = x1+517\nFind x2."  # x1 = 863, x2 = 1380


def _response(outputs, answer):
    """A response text as the eval records it: turns, each followed by its tool response (or not)."""
    parts = []
    for o in outputs:
        turn = '<think>\nx\n</think>\n\n<tool_call>\n{"name": "code_interpreter"}\n</tool_call><|im_end|>'
        parts.append(turn + f"\n<|im_start|>user\n<tool_response>\n{o}\n</tool_response><|im_end|>\n")
    parts.append(f"<think>\ndone\n</think>\n\n\\boxed{{{answer}}}<|im_end|>")
    return "<|im_start|>assistant\n".join(parts)


def test_response_tool_outputs():
    assert compare.response_tool_outputs(_response(["863", "1380"], 1380)) == ["863", "1380", None]
    assert compare.response_tool_outputs("\\boxed{3}<|im_end|>") == [None]
    # a truncated last turn has no tool response
    assert compare.response_tool_outputs(_response(["863"], 1380)[:-30]) == ["863", None]


def _train_files(rd, total=4, w_means=(0.9, 0.8, 0.7, 0.6), counts=(10, 10, 20, 20), curve=(0.2, 0.3), d1=0.1):
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "config.yaml").write_text(yaml.safe_dump({"train": {"total_steps": total}}))
    with open(rd / "metrics.jsonl", "w") as f:
        for step in range(1, total + 1):
            rec = {"step": step}
            if w_means is not None:
                rec.update(w_mean=w_means[step - 1], step_count_by_k=[counts[step - 1] // 2, counts[step - 1] // 2],
                           step_d_mean_by_k=[d1 + 0.01 * step, 0.5])
            f.write(json.dumps(rec) + "\n")
    with open(rd / "eval.jsonl", "w") as f:
        for i, a in enumerate(curve):
            f.write(json.dumps({"step": i * total, "demo_chain": {"acc": a}}) + "\n")
    sample = {"row": 0, "reward": 1.0, "tool_errors": 0, "d": [d1, 0.2], "w": [1.0, 0.5],
              "prompt": PROMPT0, "tool_outputs": ["863", "1380"]}
    # step 3's sample: turn 2 miscopied (x2 is 1380): its w is the wrong step's, not a correct one's
    wrong = {**sample, "w": [1.0, 0.05], "tool_outputs": ["863", "1381"]}
    with open(rd / "step_weights.jsonl", "w") as f:
        for step, traj in ((1, [sample]), (2, [{**sample, "w": [1.0, 0.25]}]), (3, [wrong])):
            f.write(json.dumps({"step": step, "trajectories": traj}) + "\n")


def _final_eval(rd, correct, outputs=None):
    """``correct`` [prompts, samples] bools; ``outputs[p][j]``: the tool outputs of that sample."""
    d = rd / compare.EVAL_DIR
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "generations.jsonl", "w") as f:
        for p, row in enumerate(correct):
            for j, c in enumerate(row):
                outs = outputs[p][j] if outputs is not None else ["863", "1380"]
                f.write(json.dumps({"prompt_id": p, "index": p, "data_source": "demo_chain", "sample": j,
                                    "acc": bool(c), "response": _response(outs, 1380)}) + "\n")
    (d / "summary.json").write_text(json.dumps({"n": len(correct[0])}))


def _pilot(tmp_path):
    """sod / opd / grpo x seeds 0..2 with final evaluations of known accuracy (8 prompts x 2 samples)."""
    pilot = tmp_path / "pilot"
    acc = {"sod": [0.5, 0.625, 0.75], "opd": [0.4375, 0.5, 0.75], "grpo": [0.25, 0.5, 0.375]}
    for arm, accs in acc.items():
        for s, a in enumerate(accs):
            rd = compare.run_path(pilot, arm, s)
            _train_files(rd, w_means=(0.9, 0.8, 0.7, 0.6 + 0.1 * s) if arm == "sod" else None)
            k = int(round(a * 16))  # correct samples out of 16
            flat = [j < k for j in range(16)]
            _final_eval(rd, [flat[2 * p:2 * p + 2] for p in range(8)])
    return pilot, acc


def test_plan_writes_the_rule_from_the_pilot(tmp_path):
    pilot, acc = _pilot(tmp_path)
    out = tmp_path / "cmp"
    assert demo_cli.main(["compare", "plan", "--pilot-dir", str(pilot), "--min-effect", "0.04", "--out", str(out)]) == 0
    rule = json.loads((out / "rule.json").read_text())
    d_opd = [a - b for a, b in zip(acc["sod"], acc["opd"])]  # 0.0625, 0.125, 0
    d_grpo = [a - b for a, b in zip(acc["sod"], acc["grpo"])]  # 0.25, 0.125, 0.375
    assert rule["pilot"]["seeds"] == [0, 1, 2] and rule["pilot"]["acc_source"] == "final_eval"
    assert np.allclose(rule["pilot"]["diffs"]["sod-opd"], d_opd)
    sd_opd, sd_grpo = np.std(d_opd, ddof=1), np.std(d_grpo, ddof=1)
    assert np.isclose(rule["pilot"]["sd"]["sod-opd"], sd_opd) and np.isclose(rule["pilot"]["sd"]["sod-grpo"], sd_grpo)
    need = max(6, stats.seeds_needed(sd_opd, 0.04), stats.seeds_needed(sd_grpo, 0.04))
    assert rule["n_seeds_needed"] == rule["n_seeds"] == need
    assert rule["seeds"] == list(range(3, 3 + need))  # after the pilot's seeds
    # SOD - GRPO's pilot spread (sd 0.125) needs more than 64 seeds: the cap binds, and the rule says so
    assert rule["pilot"]["capped"] == {"sod-opd": False, "sod-grpo": True} and need == 64
    # the control coefficient: every pilot SOD step's w_mean weighted by its assistant steps (10, 10, 20, 20)
    per_run = [(0.9 * 10 + 0.8 * 10 + 0.7 * 20 + (0.6 + 0.1 * s) * 20) / 60 for s in range(3)]
    assert np.isclose(rule["opd_control_coef"], np.mean(per_run), atol=1e-6)
    assert rule["arms"]["opd_control"] == ["algo.name=opd", f"algo.opd_coef={rule['opd_control_coef']}"]
    assert rule["heldout_prompts"] >= 256 and rule["min_effect"] == 0.04
    md = (out / "rule.md").read_text()
    assert "Minimum effect of interest: 0.040" in md and "paired t" in md
    # the rule is fixed: no overwrite without --force
    assert demo_cli.main(["compare", "plan", "--pilot-dir", str(pilot), "--min-effect", "0.05", "--out", str(out)]) == 2
    assert json.loads((out / "rule.json").read_text())["min_effect"] == 0.04
    assert demo_cli.main(["compare", "plan", "--pilot-dir", str(pilot), "--min-effect", "0.05", "--out", str(out),
                          "--force"]) == 0
    assert json.loads((out / "rule.json").read_text())["min_effect"] == 0.05


def test_plan_needs_a_pilot(tmp_path):
    assert demo_cli.main(["compare", "plan", "--pilot-dir", str(tmp_path / "none"), "--min-effect", "0.04",
                          "--out", str(tmp_path / "cmp")]) == 2
    assert not (tmp_path / "cmp" / "rule.json").exists()


def _value(cmd, key):
    return next(c.split("=", 1)[1] for c in cmd if c.startswith(key + "="))


def _fake_cli(calls):
    """Stands in for the train / convert / eval subprocesses: records the command, writes the files."""

    def call(cmd):
        calls.append(cmd)
        module = cmd[2]
        if module == "sod_jax.train":
            _train_files(Path(_value(cmd, "train.out_dir")))
        elif module == "sod_jax.convert":
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text("{}")
        elif module == "sod_jax.eval":
            rd = Path(_value(cmd, "model.path")).parent
            _final_eval(rd, [[True, False]] * 4)
        return 0

    return call


def _rule(tmp_path, seeds=(3, 4), heldout=None):
    rule = {"seeds": list(seeds), "opd_control_coef": 0.8125, "config": "configs/demo.yaml",
            "overrides": ["train.total_steps=4"], "heldout": str(heldout or compare.DEFAULT_HELDOUT), "eval_n": 2,
            "min_effect": 0.04, "bootstrap_reps": 2000, "bootstrap_seed": 0, "written": "now"}
    path = tmp_path / "rule_src" / "rule.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rule))
    (path.parent / "rule.md").write_text("## The rule\n\nRULE TEXT\n")
    return path, rule


def test_run_resumes_and_skips_complete_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare.runs, "_call", _fake_cli(calls))
    rule_path, rule = _rule(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", "run", "--rule", str(rule_path), "--out", str(out)]
    assert demo_cli.main(argv) == 0
    assert len(calls) == 4 * 2 * 3  # arms x seeds x (train, export, eval)
    trains = [c for c in calls if c[2] == "sod_jax.train"]
    # seed by seed, every arm; the compare-controlled settings after the rule's overrides
    assert [(_value(c, "algo.name"), _value(c, "train.seed")) for c in trains] == \
        [(a, str(s)) for s in (3, 4) for a in ("grpo", "opd", "sod", "opd")]
    control = [c for c in trains if "algo.opd_coef=0.8125" in c]
    assert len(control) == 2 and all(c.index("train.total_steps=4") < c.index("algo.name=opd") for c in control)
    assert all(_value(c, "data.seed") == _value(c, "train.seed") for c in trains)
    evals = [c for c in calls if c[2] == "sod_jax.eval"]
    # every arm of a seed gets the same evaluation draws: eval.seed = the seed
    assert all(_value(c, "eval.seed") == Path(_value(c, "eval.out_dir")).parent.name[4:] for c in evals)
    assert all(_value(c, "eval.n") == "2" and json.loads(_value(c, "eval.files")) == [rule["heldout"]] for c in evals)
    exports = [c for c in calls if c[2] == "sod_jax.convert"]
    assert all(c[c.index("--step") + 1] == "4" for c in exports)
    assert (out / "rule.json").is_file() and "RULE TEXT" in (out / "compare.md").read_text()
    rec = json.loads((out / "opd_control" / "seed3" / "compare_run.json").read_text())
    assert rec["arm_overrides"] == ["algo.name=opd", "algo.opd_coef=0.8125"] and rec["eval_seed"] == 3

    # a second session: everything is complete, nothing runs
    calls.clear()
    assert demo_cli.main(argv) == 0
    assert calls == []
    # an interrupted evaluation is redone alone; a missing export and eval both
    (out / "sod" / "seed4" / compare.EVAL_DIR / "summary.json").unlink()
    (out / "grpo" / "seed3" / compare.EXPORT_MARK).unlink()
    (out / "grpo" / "seed3" / compare.EVAL_DIR / "summary.json").unlink()
    assert demo_cli.main(argv) == 0
    assert [(c[2], c[-1]) for c in calls] == [
        ("sod_jax.convert", "--no-progress"), ("sod_jax.eval", f"eval.out_dir={out / 'grpo' / 'seed3' / 'final_eval'}"),
        ("sod_jax.eval", f"eval.out_dir={out / 'sod' / 'seed4' / 'final_eval'}")]


def test_run_refuses_mixed_settings_and_a_failed_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare.runs, "_call", _fake_cli(calls))
    rule_path, _ = _rule(tmp_path, seeds=(3,))
    out = tmp_path / "cmp"
    # the rule fixes the seeds
    assert demo_cli.main(["compare", "run", "--rule", str(rule_path), "--out", str(out), "--seeds", "1,2"]) == 2
    # without a rule: a pilot; the control arm needs the rule
    assert demo_cli.main(["compare", "run", "--seeds", "0", "--arms", "opd_control", "--out", str(out)]) == 2
    assert demo_cli.main(["compare", "run", "--seeds", "0", "--arms", "sod", "--out", str(out)]) == 0
    assert [c[2] for c in calls] == ["sod_jax.train", "sod_jax.convert", "sod_jax.eval"]
    assert demo_cli.main(["compare", "run", "--seeds", "0", "--arms", "sod", "--out", str(out),
                          "optim.lr=1e-3"]) == 2  # the run there was made with other overrides
    monkeypatch.setattr(compare.runs, "_call", lambda cmd: 3)
    assert demo_cli.main(["compare", "run", "--seeds", "1", "--arms", "sod", "--out", str(out)]) == 3


def _heldout(tmp_path, n=8):
    problems = task.make_problems(n, 5)
    path = task.write_parquet([task.rl_row(p, i, "heldout") for i, p in enumerate(problems)],
                              tmp_path / "heldout.parquet")
    return path, problems


def test_table_from_files(tmp_path, monkeypatch):
    heldout, problems = _heldout(tmp_path)
    rule_path, _ = _rule(tmp_path, seeds=(3, 4, 5), heldout=heldout)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "rule.json").write_text(rule_path.read_text())
    (out / "rule.md").write_text("## The rule\n\nRULE TEXT\n")
    seen = []

    def recovery(prompt_text, tool_outputs):  # a stand-in: "bad" marks an error, "fix" a recovery
        seen.append((prompt_text, tuple(tool_outputs)))
        if "bad" not in tool_outputs:
            return None
        return "fix" in tool_outputs

    monkeypatch.setattr(task, "error_recovery", recovery, raising=False)
    rng = np.random.default_rng(0)
    p_correct = {"sod": 0.7, "opd": 0.55, "grpo": 0.4, "opd_control": 0.6}
    per_prompt = {}
    for arm, p in p_correct.items():
        for s in (3, 4, 5):
            rd = compare.run_path(out, arm, s)
            _train_files(rd, curve=(0.2, p), d1=0.1 * s, w_means=(0.9, 0.8, 0.7, 0.6) if arm == "sod" else None)
            correct = rng.random((8, 2)) < p
            # sample 0 of prompt 0: an error, recovered in sod and not elsewhere; sample 1: an error, no recovery
            outputs = [[["863", "1380"]] * 2 for _ in range(8)]
            outputs[0] = [["bad", "fix" if arm == "sod" else "bad"], ["bad", "x"]]
            _final_eval(rd, correct.tolist(), outputs)
            per_prompt[arm, s] = correct.mean(axis=1)
    # a run of a seed outside the rule is not read
    _train_files(compare.run_path(out, "sod", 0))
    _final_eval(compare.run_path(out, "sod", 0), [[True, True]] * 8)

    assert demo_cli.main(["compare", "table", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    doc = json.loads((out / "compare.json").read_text())
    assert "RULE TEXT" in md and (out / "compare_acc.png").stat().st_size > 1000
    # each sample's prompt text comes from the held-out parquet by prompt_id, its tool outputs from its response
    assert {t for t, _ in seen} == {p.text() for p in problems}
    assert {t for t, o in seen if "bad" in o} == {problems[0].text()}
    assert {o for _, o in seen} == {("863", "1380", None), ("bad", "fix", None), ("bad", "bad", None),
                                    ("bad", "x", None)}
    for a, b in compare.COMPARISONS:
        xa = [per_prompt[a, s] for s in (3, 4, 5)]
        xb = [per_prompt[b, s] for s in (3, 4, 5)]
        diffs = [x.mean() - y.mean() for x, y in zip(xa, xb)]
        c = doc["comparisons"][f"{a}-{b}"]
        assert c["seeds"] == [3, 4, 5] and np.allclose(c["diffs"], diffs)
        t = stats.paired_t_interval(diffs)
        assert np.isclose(c["t"]["lo"], t["lo"]) and np.isclose(c["t"]["hi"], t["hi"])
        bs = stats.bootstrap_interval(xa, xb, reps=2000, seed=0)
        assert np.isclose(c["bootstrap"]["lo"], bs["lo"]) and np.isclose(c["bootstrap"]["hi"], bs["hi"])
        assert c["signs"] == list(stats.sign_count(diffs))
        row = [line for line in md.splitlines() if line.startswith(f"| {a.upper()}-{b.upper()} |")][0]
        assert f"[{t['lo']:+.3f}, {t['hi']:+.3f}]" in row and f"{t['mean']:+.3f}" in row
        assert c["verdict"] == compare.verdict(t, 0.04, True) + ("" if (a, b) in compare.PRIMARY else " (secondary)")
    # recovery: per run 2 samples with an error; sod recovers one of them
    assert doc["arms"]["sod"]["recovery"] == {"errors": 6, "recovered": 3, "rate": 0.5, "per_seed": [0.5] * 3}
    assert doc["arms"]["opd"]["recovery"]["recovered"] == 0
    assert "0.500 (3/6)" in [line for line in md.splitlines() if line.startswith("| sod |")][0]
    # final accuracy per arm and the SOD step-weight figures
    finals = [per_prompt["sod", s].mean() for s in (3, 4, 5)]
    assert np.allclose(doc["arms"]["sod"]["final_acc"], finals)
    assert doc["runs"]["sod"]["4"]["d1_mean"] == pytest.approx(0.4)
    assert doc["runs"]["sod"]["4"]["w_correct_tool_step"] == pytest.approx(0.375)
    assert doc["runs"]["sod"]["4"]["w_failed_tool_step"] == pytest.approx(0.05)
    # over training: d_1 of the whole batch per step (metrics.jsonl), w_k at correct steps per step (samples;
    # step 3 had none)
    assert doc["runs"]["sod"]["4"]["d1_curve"] == [[k, pytest.approx(0.4 + 0.01 * k)] for k in (1, 2, 3, 4)]
    assert doc["runs"]["sod"]["4"]["w_ok_curve"] == [[1, 0.5], [2, 0.25]]
    assert doc["runs"]["grpo"]["4"]["d1_curve"] == [] and (out / "compare_weights.png").stat().st_size > 1000
    w_all = (0.9 * 10 + 0.8 * 10 + 0.7 * 20 + 0.6 * 20) / 60
    assert doc["runs"]["sod"]["4"]["w_mean_all"]["w_mean"] == pytest.approx(w_all)
    assert "0" not in doc["runs"]["sod"]


def test_verdicts():
    ci = lambda lo, hi: {"lo": lo, "hi": hi}  # noqa: E731
    assert compare.verdict(ci(0.01, 0.04), 0.04, True) == "SOD better"
    assert compare.verdict(ci(-0.05, -0.01), 0.04, True) == "SOD worse"
    assert compare.verdict(ci(-0.01, 0.02), 0.04, True) == "no difference of 0.040 or more"
    assert compare.verdict(ci(-0.03, 0.05), 0.04, True) == "undecided"
    assert compare.verdict(ci(0.01, 0.04), 0.04, False) == "interim only (SOD better)"


def test_table_without_training_curves_or_rule(tmp_path):
    out = tmp_path / "explore"
    for arm in ("sod", "grpo"):
        _train_files(compare.run_path(out, arm, 0))
    assert demo_cli.main(["compare", "table", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "exploratory" in md and "| SOD-GRPO | 0 |" in md


def test_recovery_of_demo_check_samples(tmp_path, capsys):
    """demo_check generations are read by sod_jax.demo.check_task.error_recovery (chosen by data_source)."""
    from sod_jax.demo import check_task

    p = check_task.make_problems(1, 3)[0]
    tb = "Traceback (most recent call last):\n  File \"<string>\", line 2, in <module>\nAssertionError"
    v1, v2 = (str(v) for v in p.values[:2])
    outputs = [[v1, tb, v2], [tb, v1, v2], [v1, tb], [v1, v2]]  # recovered, recovered, gave up, no error
    rd = tmp_path / "run"
    d = rd / compare.EVAL_DIR
    d.mkdir(parents=True)
    with open(d / "generations.jsonl", "w") as f:
        for j, o in enumerate(outputs):
            # the error-free sample restates step 1's rule with another op (its check still passes)
            slip = check_task.step_rule(0, "-", str(p.operands[0]), str(p.check(0)))  # the task's op is +
            think = f"<think>\n{slip}\n</think>\n\n" if j == 3 else ""
            f.write(json.dumps({"prompt_id": 0, "data_source": "demo_check", "sample": j, "acc": j != 2,
                                "response": think + _response(o, p.answer)}) + "\n")
    (d / "summary.json").write_text("{}")
    fe = compare.final_eval(rd, {0: p.text()})
    assert fe["recovery"] == {"errors": 3, "recovered": 2, "rate": 2 / 3}
    assert fe["acc"] == 0.75 and fe["per_prompt"] == {0: 0.75}
    assert compare.final_eval(rd)["recovery"] is None  # no prompt texts: no recovery figures
    # the same figures through python -m sod_jax.demo recovery, from a held-out parquet of that prompt
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sod_jax.demo.__main__ import main as demo_main

    heldout = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist([check_task.rl_row(p, 0, "heldout")]), heldout)
    capsys.readouterr()
    assert demo_main(["recovery", str(d), "--heldout", str(heldout)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["failed_check"], out["recovered"], out["acc"], out["samples"]) == (3, 2, 0.75, 4)
    assert (out["restated_rules"], out["restated_op_wrong"], out["restated_op_wrong_clean"]) == (1, 1.0, 1.0)
    assert demo_main(["recovery", str(tmp_path / "missing"), "--heldout", str(heldout)]) == 2
    assert "generations.jsonl is missing" in capsys.readouterr().err
    # the step-weight samples of demo_check prompts: the failed check is the wrong step
    assert compare.step_failures({"prompt": p.text(), "tool_outputs": [v1, tb, v2, None], "w": [1, 1, 1, 1]}) == \
        [False, True, False, False]
