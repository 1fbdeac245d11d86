"""The RL side: ``batch`` (trajectories -> the packed ``RLBatch`` of one update), ``update`` (the one
compiled update: old/teacher log-probs, step weights, advantages, PPO mini-batches, AdamW) and
``trainer`` (the RL loop). ``python -m sod_jax.train`` is the CLI."""
