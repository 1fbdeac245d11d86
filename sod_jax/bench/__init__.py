"""Benchmarks against baselines run in the same process: ``python -m sod_jax.bench --help``."""
