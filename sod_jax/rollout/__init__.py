"""Rollouts: the slot sampler (engine.py) and per-slot sampling (sampling.py)."""

from sod_jax.rollout.engine import Completion, Engine, EngineError, Request
from sod_jax.rollout.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineError", "Request", "SamplingParams"]
