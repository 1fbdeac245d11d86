"""The program set of a config, enumerated from the config and the student's config.json alone (no
weight, no compile): the paper configs stay within the documented bound, and the set grows with
the config's ladders, never with the data."""

import glob
import shutil
from pathlib import Path

import pytest

from sod_jax.config import load_config
from sod_jax.models.hf import read_config
from sod_jax.programs import count_by_program, unique
from sod_jax.rl import programs as rl_programs
from sod_jax.rl.batch import length_buckets

REPO = Path(__file__).resolve().parents[2]
BOUND = 100  # engine programs of a paper config (docs/engine.md)


@pytest.fixture(scope="module")
def qwen3_06b(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_0.6b")
    shutil.copy(REPO / "tests" / "fixtures" / "qwen3" / "config.Qwen3-0.6B.json", d / "config.json")
    return read_config(d)


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*_qwen3_*.yaml"))))
def test_paper_configs_make_a_bounded_program_set(path, qwen3_06b):
    if "/sft_" in path:
        pytest.skip("an SFT config: no engine")
    cfg = load_config([path])
    calls = unique(rl_programs.engine_calls_for(cfg, qwen3_06b))
    by = count_by_program(calls)
    assert len(calls) <= BOUND, (path, len(calls), by)
    # one decode program per sampling mode (the rollouts', the eval's), whatever the cache length
    assert by["decode"] == 2
    assert set(by) == {"init_state", "set_slot", "sampling_copy", "prefill", "insert", "decode", "decode_rows",
                       "extend"}
    # the update: one program per length bucket
    assert len(length_buckets(cfg.data.max_prompt_length + cfg.rollout.max_response_length)) == 9


def test_the_set_follows_the_ladders_not_the_data(qwen3_06b):
    cfg = load_config([str(REPO / "configs" / "sod_qwen3_0.6b.yaml")])
    base = unique(rl_programs.engine_calls_for(cfg, qwen3_06b))
    # a longer response budget adds no program: the cache length is read through a window, not a shape
    longer = load_config([str(REPO / "configs" / "sod_qwen3_0.6b.yaml")], ["rollout.max_response_length=40000"])
    assert len(unique(rl_programs.engine_calls_for(longer, qwen3_06b))) == len(base)
    # the held-out KL adds its own phase (one sample per prompt)
    kl = load_config([str(REPO / "configs" / "sod_qwen3_0.6b.yaml")], ["eval.kl_prompts=32"])
    phases = rl_programs.engine_phases(kl, needs_teacher=True)
    assert [p.label for p in phases] == ["rollouts", "eval", "heldout_kl"] and phases[2].n == 1
    assert len(unique(rl_programs.engine_calls_for(kl, qwen3_06b))) > len(base)
