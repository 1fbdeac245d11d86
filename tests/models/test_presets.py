"""Presets equal the published Qwen3 config.json facts."""

import json

import pytest
from conftest import QWEN3_FACTS

from sod_jax.models import preset
from sod_jax.models.hf import config_from_hf


@pytest.mark.parametrize("name,size", [("qwen3-0.6b", "0.6B"), ("qwen3-1.7b", "1.7B"), ("qwen3-4b", "4B"),
                                       ("qwen3-8b", "8B")])
def test_presets_match_hf_configs(name, size):
    d = json.loads((QWEN3_FACTS / f"config.Qwen3-{size}.json").read_text())
    assert preset(name) == config_from_hf(d)


def test_param_counts():
    # Qwen3-0.6B: 596M with tied embeddings; 8B untied: 8.19B (published figures).
    assert abs(preset("qwen3-0.6b").num_params() / 1e6 - 596) < 1
    assert abs(preset("qwen3-8b").num_params() / 1e9 - 8.19) < 0.01
