"""SFT stopped by held-out tool-using accuracy (sft.accuracy_*): the decision rules, the config
errors, and the CLI end to end from the shipped demo student, where the accuracy the hook records
for the checkpoint it stops at equals what `python -m sod_jax.eval` measures on the exported model."""

import json
from types import SimpleNamespace

import pytest

from sod_jax.config import ConfigError, load_config
from sod_jax.demo import DATA_DIR, STUDENT_DIR
from sod_jax.sft.accuracy_hook import accuracy_decision


def _sft(**kw):
    base = dict(snapshot_accuracy_band=[], stop_accuracy_at_least=None, stop_accuracy_band=[])
    return SimpleNamespace(**{**base, **kw})


def test_accuracy_decision():
    s = _sft(snapshot_accuracy_band=[0.1, 0.3], stop_accuracy_at_least=0.85)
    assert accuracy_decision(0.05, s, False) == (False, None)
    assert accuracy_decision(0.1, s, False) == (True, None)  # band edges are inside
    assert accuracy_decision(0.2, s, True) == (False, None)  # one snapshot only
    assert accuracy_decision(0.85, s, True) == (False, "accuracy_reached")
    s = _sft(stop_accuracy_band=[0.1, 0.3])
    assert accuracy_decision(0.31, s, False) == (False, None)
    assert accuracy_decision(0.3, s, False) == (False, "accuracy_in_band")


def test_accuracy_config_errors_name_the_key(tmp_path):
    from sod_jax.sft.cli import check_sft_config

    base = ["configs/demo_student_sft.yaml"]
    cases = {
        "sft.accuracy_files": ["sft.accuracy_files=[]"],
        "does not exist": [f"sft.accuracy_files=[{tmp_path / 'nope.parquet'}]"],
        "sft.stop_accuracy_band": ["sft.stop_accuracy_band=[0.3,0.1]"],
        "sft.snapshot_out": ["sft.snapshot_accuracy_band=[0.1,0.3]", "sft.snapshot_out=null"],
        "sft.accuracy_every > 0": ["sft.accuracy_every=0"],
    }
    for needle, overrides in cases.items():
        cfg = load_config(base, overrides, job="sft")
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace(">", ".").replace("+", r"\+")):
            check_sft_config(cfg)
    check_sft_config(load_config(["configs/demo_teacher_sft.yaml"], [], job="sft"))


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_cli_stops_by_accuracy_and_eval_cli_agrees(tmp_path):
    from sod_jax.eval import main as eval_main
    from sod_jax.sft.cli import main as sft_main

    out = tmp_path / "sft"
    snap = tmp_path / "snap"
    # Fine-tune the shipped student; measure every 3 steps on 16 held-out prompts. The snapshot band
    # [0, 1] and the stop at >= 0 both fire at the first measurement (step 3).
    rc = sft_main(["--config", "configs/demo_student_sft.yaml", "--no-progress", f"sft.out_dir={out}",
                   "sft.init=null", f"model.path={STUDENT_DIR}", "sft.max_steps=40", "sft.lr=3e-4",
                   "sft.accuracy_every=3", "sft.accuracy_prompts=16", "sft.accuracy_after_loss=1e9",
                   "sft.stop_accuracy_band=[]", "sft.snapshot_accuracy_band=[0.0,1.0]", f"sft.snapshot_out={snap}",
                   "sft.stop_accuracy_at_least=0.0", "logging.plots=false"])
    assert rc == 0
    recs = _records(out / "accuracy.jsonl")
    assert [r["step"] for r in recs] == [3]  # the first measurement already satisfies the stop rule
    metrics = _records(out / "metrics.jsonl")
    assert max(r["step"] for r in metrics) == 3  # stopped at the measured step
    for d in (out / "model", out / "best", snap):
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    assert recs[0]["tool_calls"] > 1.0 and 0.0 <= recs[0]["acc"] <= 1.0

    # The eval CLI on the exported model, same rows, greedy: the same accuracy.
    ev = tmp_path / "eval"
    rc = eval_main(["--config", "configs/demo_chain.yaml", "--no-progress", f"model.path={out / 'model'}",
                    f"eval.files=[{DATA_DIR / 'heldout_eval.parquet'}]", f"eval.out_dir={ev}", "eval.n=1",
                    "eval.ks=[1]", "eval.temperature=0", "eval.max_response_length=256",
                    "rollout.max_assistant_turns=4", "rollout.prefill_buckets=[64,128]"])
    assert rc == 0
    gens = _records(ev / "generations.jsonl")
    by_prompt = sorted(gens, key=lambda g: g["prompt_id"])[:16]
    acc16 = sum(float(bool(g["acc"])) for g in by_prompt) / 16
    assert acc16 == pytest.approx(recs[0]["acc"], abs=1e-9)
