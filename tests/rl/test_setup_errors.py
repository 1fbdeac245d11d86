"""Set-up failures of `python -m sod_jax.train` are one `error:` line and exit 2, found before any
weights load where they can be; errors of the training steps still surface as they are.

The checkpoints here are the real Qwen3-0.6B / Qwen3-4B config.json files with no weights at all, so
a run that tried to load weights would fail differently."""

import json
import logging
import shutil

import jax
import pytest
from conftest import QWEN3_FACTS, REPO, build_tokenizer

from sod_jax import train as train_cli
from sod_jax.rl.trainer import SetupError, Trainer

PAPER = str(REPO / "configs" / "sod_qwen3_0.6b.yaml")


@pytest.fixture(autouse=True)
def _keep_logging():
    """train.main sets up the root logger (force=True); give the test session its handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup_errors")
    student, teacher = root / "student", root / "teacher"
    build_tokenizer(student)
    teacher.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):  # one tokenizer: the special ids must agree
        shutil.copy(student / f, teacher / f)
    shutil.copy(QWEN3_FACTS / "config.Qwen3-0.6B.json", student / "config.json")
    shutil.copy(QWEN3_FACTS / "config.Qwen3-4B.json", teacher / "config.json")
    rows = [{"data_source": "math", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"}, "extra_info": {"index": i}}
            for i in range(80)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": student, "teacher": teacher, "data": data, "root": root}


def _args(paths, *extra):
    return ["--no-progress", "--config", PAPER, f"model.path={paths['student']}", f"teacher.path={paths['teacher']}",
            f"data.train_files=[{paths['data']}]", "data.val_files=[]", f"train.out_dir={paths['root'] / 'run'}",
            "compile.cache_dir=none", *extra]


def _kv_bytes_per_slot(max_len: int) -> int:
    c = json.loads((QWEN3_FACTS / "config.Qwen3-0.6B.json").read_text())
    return max_len * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2 * 2  # k and v, bf16


def _last_line(err: str) -> str:
    return [ln for ln in err.splitlines() if ln.strip()][-1]


def test_kv_cache_over_budget_fails_before_any_weights_load(paths, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr("sod_jax.rl.trainer.load_pretrained", lambda *a, **k: loads.append(a) or 1 / 0)
    rc = train_cli.main(_args(paths, "rollout.kv_cache_budget_gb=20", "rollout.num_slots=256"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not loads
    assert "Traceback" not in err
    line = _last_line(err)
    # The paper's slots: 256 x (2560 + 20480) tokens, split over the 8 devices (fsdp=-1): 32 per device.
    # The largest count that fits 20 GiB per device, from the formula: 8 slots per device, 64 in all.
    assert jax.device_count() == 8
    fit = 20 * 2**30 // _kv_bytes_per_slot(2560 + 20480) * 8
    assert fit == 64
    assert line.startswith("error:") and "rollout.num_slots" in line and f"rollout.num_slots={fit}" in line, line
    assert "78.75 GiB per device (8 devices: 32 slots each)" in line and "20.00 GiB" in line, line


def test_no_slot_count_fits(paths, capsys):
    # 2 GiB per device holds no slot of 23040 tokens (rollout.n=16: a GRPO group is decoded at once).
    rc = train_cli.main(_args(paths, "rollout.kv_cache_budget_gb=2", "rollout.num_slots=256"))
    line = _last_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("error:") and "no rollout.num_slots >= 16 fits" in line, line


def test_fitting_slot_count_passes_the_check(paths):
    from sod_jax.config import load_config
    from sod_jax.models.hf import read_config

    fit = 20 * 2**30 // _kv_bytes_per_slot(2560 + 20480) * 8  # per device x 8 devices
    base = _args(paths)[3:]
    for slots, ok in ((fit, True), (fit + 8, False)):
        cfg = load_config([PAPER], base + ["rollout.kv_cache_budget_gb=20", f"rollout.num_slots={slots}"])
        t = Trainer(cfg, progress=False)
        t.student_cfg = read_config(paths["student"])
        try:
            if ok:
                t._check_kv_cache()
            else:
                with pytest.raises(SetupError, match=f"rollout.num_slots={fit}"):
                    t._check_kv_cache()
        finally:
            t.close()


def test_other_setup_errors_are_one_line(paths, capsys, monkeypatch):
    from sod_jax.rollout.engine import EngineError

    monkeypatch.setattr(Trainer, "preflight", lambda self: None)

    def setup(self):
        raise EngineError("first line\n  - second line")

    monkeypatch.setattr(Trainer, "setup", setup)
    rc = train_cli.main(_args(paths))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert _last_line(err) == "error: first line; second line"


def test_errors_of_the_steps_still_surface(paths, monkeypatch):
    monkeypatch.setattr(Trainer, "preflight", lambda self: None)
    monkeypatch.setattr(Trainer, "setup", lambda self: None)

    def run(self):
        raise ValueError("a bug in a training step")

    monkeypatch.setattr(Trainer, "run", run)
    with pytest.raises(ValueError, match="a bug in a training step"):
        train_cli.main(_args(paths))
