"""Architecture presets: the published Qwen3 dense sizes, plus tiny ones for tests and the CPU demo."""

from __future__ import annotations

from typing import Any

from sod_jax.models.qwen3 import Qwen3Config

_QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # The CPU preset: the size of the CPU demo's models (DESIGN §8: 4 layers, d=128, small BPE).
    "cpu-tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    # Benchmark presets (issue: train-step bench): student hidden 256 / 4 layers, teacher 384 / 6.
    "bench-student": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "bench-teacher": dict(vocab_size=4096, hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}


def preset(name: str, **runtime: Any) -> Qwen3Config:
    """:class:`Qwen3Config` of a named preset; keyword arguments override any field (dtype, layers, ...)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known: {', '.join(PRESETS)}")
    return Qwen3Config(**{**PRESETS[name], **runtime})
