"""Sandboxes for model-written code (SandboxFusion-shaped protocol): local isolated executor,
HTTP client and server."""

from sod_jax.sandbox.local import LocalSandbox, LocalSandboxConfig
from sod_jax.sandbox.protocol import Sandbox, SandboxUnavailable, run_request

__all__ = ["LocalSandbox", "LocalSandboxConfig", "Sandbox", "SandboxUnavailable", "run_request"]
