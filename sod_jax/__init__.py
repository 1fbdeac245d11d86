"""sod_jax: step-wise on-policy distillation (SOD) for small tool-using language-model agents, in JAX."""

__version__ = "0.1.0"
