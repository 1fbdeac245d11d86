"""Evaluation: ``evaluate`` (tool-using samples per prompt, scored and summarised per data_source,
resumable) and ``metrics`` (pass@k, avg@k, maj@k and the reference's bootstrap figures).
``python -m sod_jax.eval`` is the CLI."""
