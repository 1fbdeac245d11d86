"""``python -m sod_jax.sft``: cold-start SFT (the CLI lives in :mod:`sod_jax.sft.cli`)."""

import sys

from sod_jax.sft.cli import main

sys.exit(main())
