"""Qwen3 in Flax NNX, HF checkpoint I/O, presets and chunked log-probs."""

from sod_jax.models.hf import CheckpointError, load_pretrained, read_config, save_pretrained
from sod_jax.models.logprobs import token_logprobs, token_logprobs_and_entropy
from sod_jax.models.presets import PRESETS, preset
from sod_jax.models.qwen3 import Qwen3, Qwen3Config, init_model

__all__ = ["CheckpointError", "PRESETS", "Qwen3", "Qwen3Config", "init_model", "load_pretrained", "preset",
           "read_config", "save_pretrained", "token_logprobs", "token_logprobs_and_entropy"]
