"""Rollouts: the slot sampler (engine.py), continuous batching over it (scheduler.py, also
``generate``), per-slot sampling (sampling.py), the call ladders and KV cache arithmetic (sizes.py), the
multi-turn tool agent (agent.py)."""

from sod_jax.rollout.engine import Completion, Engine, EngineError, Request
from sod_jax.rollout.sampling import SamplingParams
from sod_jax.rollout.scheduler import generate

__all__ = ["Completion", "Engine", "EngineError", "Request", "SamplingParams", "generate"]
