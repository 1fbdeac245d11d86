"""The one place a sandbox is built from the config's ``sandbox`` section (RL loop, eval, SFT hook)."""

from __future__ import annotations

from typing import Any

from sod_jax.sandbox.fusion import FusionSandbox
from sod_jax.sandbox.local import LocalSandbox, LocalSandboxConfig
from sod_jax.sandbox.protocol import Sandbox


def make_sandbox(sandbox_cfg: Any) -> Sandbox:
    """``backend: fusion`` gives an HTTP client of a SandboxFusion-compatible server; ``local`` the
    isolated executor. Raises :class:`~sod_jax.sandbox.protocol.SandboxUnavailable` when no
    isolation mechanism works here (and ``allow_unconfined`` is off)."""
    s = sandbox_cfg
    if s.backend == "fusion":
        return FusionSandbox(s.url, max_concurrency=s.max_concurrency, retries=s.retries)
    return LocalSandbox(LocalSandboxConfig.from_config(s))
