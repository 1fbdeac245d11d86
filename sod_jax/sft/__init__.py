"""Cold-start SFT: ``packing`` (conversations -> packed rows with the assistant-token loss mask),
``step`` (the compiled step and the step plan), ``trainer`` (the loop, on the shared skeleton of
:mod:`sod_jax.loop`, with checkpoints and preemption as its hooks), ``accuracy_hook`` (held-out
tool-using accuracy, snapshots and stopping by it). ``python -m sod_jax.sft`` is the CLI
(:mod:`sod_jax.sft.cli`)."""
