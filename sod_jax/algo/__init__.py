"""Array math of the RL objective: SOD step weights, advantages of every mode, the PPO loss."""

from sod_jax.algo import advantages, losses, sod
from sod_jax.algo.sod import step_weights

__all__ = ["advantages", "losses", "sod", "step_weights"]
