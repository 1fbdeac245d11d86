"""The paper configs resolve to the reference run's settings (examples/SOD/run_sod.sh and its tool
config), and the run-setting keys validate as documented."""

from pathlib import Path

import pytest

from sod_jax.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = [f"{mode}_qwen3_{size}.yaml" for mode in ("sod", "opd", "gated_opd", "grpo", "iw_opd")
         for size in ("0.6b", "1.7b")]

REFERENCE = {
    ("sandbox", "run_timeout"): 60.0, ("sandbox", "memory_limit_mb"): 2048,
    ("train", "total_epochs"): 1, ("train", "total_steps"): None, ("train", "epochs"): 1,
    ("train", "eval_every"): 10, ("checkpoint", "save_every"): 10, ("data", "seed"): 1,
    ("data", "max_prompt_length"): 2560, ("eval", "max_prompt_length"): 4096,
    ("tool", "on_parse_error"): "end", ("tool", "failure_text"): "reference",
    ("tool", "description"): "A tool for executing code.", ("tool", "parameter_description"): "The code to execute.",
    ("tool", "max_output_chars"): 256, ("algo", "beta_max"): 0.1, ("algo", "rollout_is"): "none",
    ("rollout", "n"): 16, ("rollout", "max_response_length"): 20480, ("rollout", "max_assistant_turns"): 16,
    ("train", "prompts_per_step"): 64,
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_carry_the_reference_settings(name):
    cfg = load_config(CONFIGS / name)
    for (sec, key), value in REFERENCE.items():
        assert getattr(getattr(cfg, sec), key) == value, f"{name}: {sec}.{key}"
    assert cfg.data.val_files == ["data/aime2024.parquet", "data/aime2025.parquet"]
    assert cfg.algo.name == name.split("_qwen3_")[0]
    assert (cfg.teacher.path is None) == (cfg.algo.name == "grpo")
    assert cfg.model.path.startswith(f"checkpoints/qwen3-{name.rsplit('_', 1)[1][:-5]}")


def test_defaults_are_the_reference_settings():
    cfg = load_config(overrides=["algo.name=grpo"])
    for (sec, key), value in REFERENCE.items():
        assert getattr(getattr(cfg, sec), key) == value, f"{sec}.{key}"


def test_ppo_epochs_reach_the_update():
    from sod_jax.rl.update import UpdateSpec

    assert UpdateSpec.from_config(load_config(overrides=["algo.name=grpo", "train.epochs=2"])).epochs == 2
    with pytest.raises(ConfigError, match=r"train.epochs must be >= 1"):
        load_config(overrides=["algo.name=grpo", "train.epochs=0"])


@pytest.mark.parametrize("value,ok", [("null", True), ("0", True), ("500", True), ("-1", False)])
def test_total_steps_null_zero_or_positive(value, ok):
    overrides = ["algo.name=grpo", f"train.total_steps={value}"]
    if ok:
        load_config(overrides=overrides)
    else:
        with pytest.raises(ConfigError, match="train.total_steps must be null or 0"):
            load_config(overrides=overrides)


@pytest.mark.parametrize("override,match", [
    ("tool.failure_text=loud", "tool.failure_text"), ("tool.truncate_head=-1", "tool.truncate_head"),
    ("algo.rollout_is=seq", "algo.rollout_is"), ("algo.rollout_is_cap=0", "algo.rollout_is_cap"),
    ("algo.iw_opd_gamma=-1", "algo.iw_opd_gamma"), ("train.total_epochs=0", "train.total_epochs"),
    ("eval.max_prompt_length=0", "eval.max_prompt_length"),
])
def test_new_keys_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=["algo.name=grpo", override])


def test_iw_opd_needs_a_teacher_and_gated_opd_accepts_an_empty_range():
    with pytest.raises(ConfigError, match="algo.name=iw_opd needs a teacher"):
        load_config(overrides=["algo.name=iw_opd"])
    cfg = load_config(overrides=["algo.name=gated_opd", "teacher.path=t", "algo.beta_max=0.0"])
    assert cfg.algo.beta_max <= cfg.algo.beta_min  # valid: the distillation term is off
