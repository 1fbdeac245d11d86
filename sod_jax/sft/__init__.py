"""Cold-start SFT: ``packing`` (conversations -> packed rows with the assistant-token loss mask),
``step`` (the compiled step and the step plan), ``trainer`` (the loop and its hook points),
``checkpoint_hook`` and ``accuracy_hook`` (checkpoints / preemption; held-out tool-using accuracy).
``python -m sod_jax.sft`` is the CLI (:mod:`sod_jax.sft.cli`)."""
