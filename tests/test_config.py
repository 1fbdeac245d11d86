"""Config tree: paper defaults, YAML + dotted overrides, and errors that name key, file and nearest key."""

import subprocess
import sys
from typing import Any

import pytest
import yaml

from sod_jax.config import Config, ConfigError, from_dict, load_config, reference_markdown

TEACHER = ["teacher.path=/ckpt/teacher"]


def test_defaults_are_the_paper_run():
    cfg = load_config(overrides=TEACHER)
    assert (cfg.algo.name, cfg.algo.eps, cfg.algo.delta, cfg.algo.opd_coef) == ("sod", 1e-6, 0.2, 1.0)
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.dual_clip, cfg.algo.log_ratio_clamp) == (0.2, 0.28, 3.0, 20.0)
    assert cfg.algo.loss_agg == "token-mean"
    assert (cfg.optim.lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, 0.9, 0.999, 0.01, 1.0)
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.train.mini_batches) == (64, 16, 4)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_response_length, cfg.rollout.max_assistant_turns) == (2560, 20480, 16)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.eval.top_p, cfg.eval.n) == (1.0, 1.0, 0.6, 32)
    assert (cfg.reward.overlong_buffer_len, cfg.tool.max_output_chars, cfg.tool.max_parallel_calls) == (1024, 256, 1)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"algo": {"name": "grpo", "delta": 0.3}, "mesh": {"fsdp": 2, "tensor": 4},
                                 "data": {"train_files": ["a.parquet"]}}))
    cfg = load_config(f, ["algo.delta=0.5", "mesh.fsdp=4", "data.train_files=['a.parquet', 'b.parquet']", "optim.lr=3e-6"])
    assert cfg.algo.name == "grpo" and cfg.algo.delta == 0.5 and cfg.mesh.fsdp == 4 and cfg.mesh.tensor == 4
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.optim.lr == 3e-6 and isinstance(cfg.optim.lr, float)
    # the resolved config round-trips
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(overrides=TEACHER + ["algo.delta=1"]).algo.delta == 1.0
    with pytest.raises(ConfigError, match=r"'train.total_steps'.*must be int.*2.5"):
        load_config(overrides=TEACHER + ["train.total_steps=2.5"])


def test_unknown_key_in_file_names_key_file_and_nearest(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("algo:\n  detla: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "'algo.detla'" in msg and str(f) in msg and "did you mean 'algo.delta'" in msg


def test_unknown_section_and_override(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollouts:\n  n: 8\n")
    with pytest.raises(ConfigError, match=r"'rollouts'.*bad.yaml.*did you mean 'rollout'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"'optim.learning_rate'.*command line"):
        load_config(overrides=TEACHER + ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["algo.delta"])


def test_wrong_type_names_key_file_and_type(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  n: sixteen\n")
    with pytest.raises(ConfigError, match=r"'rollout.n' in file '.*bad.yaml' must be int, got 'sixteen'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"'algo.name'.*one of 'grpo', 'opd', 'sod'"):
        load_config(overrides=["algo.name=ppo"])


def test_impossible_combinations(tmp_path):
    f = tmp_path / "sod.yaml"
    f.write_text("algo:\n  name: sod\n")
    with pytest.raises(ConfigError, match=r"(?s)sod.yaml.*algo.name=sod needs a teacher: set teacher.path"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"train.prompts_per_step \(10\) must be divisible by train.mini_batches \(4\)"):
        load_config(overrides=TEACHER + ["train.prompts_per_step=10"])
    with pytest.raises(ConfigError, match="at most one of mesh"):
        load_config(overrides=TEACHER + ["mesh.data=-1"])
    load_config(overrides=["algo.name=opsd_gt"])  # self-distillation needs no teacher


def test_missing_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_every_field_is_documented():
    ref = reference_markdown()
    for sec in Config.__dataclass_fields__:
        assert f"**`{sec}`**" in ref
    assert "| `algo.delta` | float | `0.2` |" in ref


def test_print_config_cli(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("algo:\n  name: grpo\n")
    out = subprocess.run([sys.executable, "-m", "sod_jax.config", "--config", str(f), "algo.delta=0.7", "--print-config"],
                         capture_output=True, text=True, check=True).stdout
    resolved = yaml.safe_load(out)
    assert resolved["algo"]["name"] == "grpo" and resolved["algo"]["delta"] == 0.7
    bad = subprocess.run([sys.executable, "-m", "sod_jax.config", "algo.detla=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'algo.delta'" in bad.stderr


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        job = "sft" if f.name.startswith(("sft_", "demo_teacher_sft", "demo_student_sft")) else (
            "eval" if f.name.startswith("eval_") else "train")
        cfg = load_config(f, job=job)
        assert cfg.model.path or cfg.sft.init, f  # a checkpoint to start from, or SFT from a random init


def test_docs_config_reference_is_current():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert reference_markdown().strip() in page, "regenerate with: python -m sod_jax.config --reference"


def test_new_sections_and_keys():
    cfg = load_config(overrides=TEACHER + ["distributed.coordinator=10.0.0.1:1234", "distributed.num_processes=2",
                                           "distributed.process_id=1", "train.micro_batch_size=16",
                                           "teacher.logprob_chunk=128", "teacher.attention_block=0",
                                           "model.tokenizer=/tok"])
    assert (cfg.distributed.coordinator, cfg.distributed.num_processes, cfg.distributed.process_id) == ("10.0.0.1:1234", 2, 1)
    assert (cfg.train.micro_batch_size, cfg.teacher.logprob_chunk, cfg.teacher.attention_block) == (16, 128, 0)
    assert cfg.model.tokenizer == "/tok"
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(48\) must divide .* = 256"):
        load_config(overrides=TEACHER + ["train.micro_batch_size=48"])
    with pytest.raises(ConfigError, match="distributed.process_id must be in"):
        load_config(overrides=TEACHER + ["distributed.num_processes=2", "distributed.process_id=2",
                                         "distributed.coordinator=h:1"])
    with pytest.raises(ConfigError, match="needs distributed.coordinator"):
        load_config(overrides=TEACHER + ["distributed.num_processes=2", "distributed.process_id=0"])
    ref = reference_markdown()
    for key in ("distributed.coordinator", "distributed.num_processes", "distributed.process_id",
                "train.micro_batch_size", "teacher.logprob_chunk", "teacher.attention_block", "model.tokenizer"):
        assert f"`{key}`" in ref, key


def test_nested_values_name_the_inner_key():
    """dict-of-section and list-of-dict values: errors point inside the value."""
    import dataclasses
    from typing import Optional

    from sod_jax.config import _coerce

    @dataclasses.dataclass
    class Scorer:
        name: str = "math"
        timeout: float = 1.0
        extra: Optional[dict] = None

    out = _coerce({"aime": {"name": "math", "timeout": 2}, "gpqa": {"name": "choice"}}, dict[str, Scorer])
    assert out["aime"] == Scorer("math", 2.0) and out["gpqa"] == Scorer("choice")
    assert _coerce([{"a": 1}, {"b": [2]}], list[dict[str, Any]]) == [{"a": 1}, {"b": [2]}]
    from sod_jax.config import _BadNested

    with pytest.raises(_BadNested) as e:
        _coerce({"aime": {"timout": 2}}, dict[str, Scorer])
    assert e.value.path == "['aime'].timout" and "valid fields: name, timeout, extra" in e.value.msg
    with pytest.raises(_BadNested) as e:
        _coerce([{"name": "x"}, {"timeout": "slow"}], list[Scorer])
    assert e.value.path == "[1].timeout" and "must be float" in e.value.msg


def test_unimplemented_key_is_rejected_by_name(monkeypatch):
    import dataclasses

    import sod_jax.config as c

    orig = c._fields

    def patched(cls):
        out = dict(orig(cls))
        if cls is c.RolloutConfig:
            f, tp = out["kv_cache_budget_gb"]
            g = dataclasses.field(default=f.default, metadata={**f.metadata, "implemented": False})
            g.name = f.name
            out["kv_cache_budget_gb"] = (g, tp)
        return out

    monkeypatch.setattr(c, "_fields", patched)
    load_config(overrides=TEACHER)  # the default is accepted
    with pytest.raises(ConfigError, match=r"rollout.kv_cache_budget_gb is not implemented yet"):
        load_config(overrides=TEACHER + ["rollout.kv_cache_budget_gb=2"])
