"""Array math of the RL objective: SOD step weights, IW-OPD weights, advantages of every mode, the PPO
loss, the rollout importance correction."""

from sod_jax.algo import advantages, iw_opd, losses, rollout_correction, sod
from sod_jax.algo.iw_opd import iw_opd_weights
from sod_jax.algo.rollout_correction import mismatch_stats, rollout_is_weights
from sod_jax.algo.sod import step_weights

__all__ = ["advantages", "iw_opd", "iw_opd_weights", "losses", "mismatch_stats", "rollout_correction",
           "rollout_is_weights", "sod", "step_weights"]
