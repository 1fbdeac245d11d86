"""What every CLI that computes (train, sft, eval, generate) does first, in this order: logging,
for a multi-process job the supervising parent (:mod:`sod_jax.supervise`), joining the cluster
(:func:`sod_jax.parallel.start_distributed`, before any other JAX work) and the persistent
compilation cache (:mod:`sod_jax.compile_cache`)."""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from sod_jax import compile_cache, parallel, supervise


def start_job(dist_cfg: Any = None, *, cache_dir: Optional[str] = None, out_dir: Optional[str] = None,
              log_level: int = logging.WARNING) -> Optional[int]:
    """Set up the process for one job; returns None to go on, or the exit code (2) after printing a
    one-line error. ``out_dir`` (the job's run directory) turns the compilation cache on as
    ``compile.cache_dir`` says; None leaves it as the environment has it."""
    # force: importing jax / orbax already gave the root logger a handler, which would make this a no-op
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s", force=True)
    supervise.child_started()
    if parallel.joins_cluster(dist_cfg):
        # One of several processes: the work runs in a child, and this process reports a lost
        # coordinator by name (JAX's runtime ends the child itself; see sod_jax.supervise).
        code = supervise.supervised()
        if code is not None:
            return code
    try:
        started = parallel.start_distributed(dist_cfg)  # every host joins one run
    except parallel.DistributedStartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if started["initialized"]:
        supervise.child_joined(parallel.process_index(), parallel.coordinator_address())
    if out_dir is not None:
        compile_cache.enable(cache_dir, out_dir)  # a rerun loads its programs instead of compiling them
    return None
