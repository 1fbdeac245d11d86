"""Array math of the RL objective: SOD step weights, IW-OPD weights, advantages of every mode, the PPO
loss, the rollout importance correction, and the one table of algorithm modes (:mod:`.modes`).

Submodules load on first use (``sod_jax.algo.sod``, ``from sod_jax.algo import step_weights``), so
importing the pure-Python :mod:`sod_jax.algo.modes` (as the config leaf does) does not import jax.
"""

import importlib

_SUBMODULES = ("advantages", "iw_opd", "losses", "modes", "rollout_correction", "sod")
_NAMES = {"iw_opd_weights": "iw_opd", "mismatch_stats": "rollout_correction",
          "rollout_is_weights": "rollout_correction", "step_weights": "sod"}

__all__ = sorted(_SUBMODULES + tuple(_NAMES))


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
