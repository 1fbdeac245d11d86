"""The persistent compilation cache and the count of compilations.

:func:`enable` points JAX's persistent compilation cache at ``compile.cache_dir`` (default
``<out_dir>/xla_cache`` of the job) for the train, sft and eval CLIs, with no minimum compile time
or entry size, so a restarted run (a preempted pod, a resumed job) loads every program it compiled
before instead of compiling it again. ``JAX_COMPILATION_CACHE_DIR`` in the environment wins (JAX
read it at import). A ``gs://`` (or any ``scheme://``) path is passed through unchanged.

:class:`CompileCounter` counts compilations from JAX's own monitoring events:

* ``/jax/core/compile/backend_compile_duration``: one per XLA program built for a new shape or
  function, with its seconds (a program loaded from the persistent cache counts too, with the
  seconds the load took);
* ``/jax/compilation_cache/cache_hits`` / ``cache_misses``: programs loaded from / written to the
  persistent cache (only while it is on).

The listeners are registered once per process and only add to counters; a counter's
:meth:`~CompileCounter.take` returns what happened since its previous call.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import jax
from jax import monitoring

log = logging.getLogger("sod_jax.compile")

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def resolve_cache_dir(setting: str | None, out_dir: str) -> str | None:
    """The cache directory ``compile.cache_dir`` names: ``""`` -> ``<out_dir>/xla_cache``; ``none``
    -> None (off); a ``scheme://`` URL as is; a local path made absolute."""
    s = (setting or "").strip()
    if s.lower() in ("none", "off", "null"):
        return None
    if not s:
        s = out_dir.rstrip("/") + "/xla_cache" if "://" in out_dir else os.path.join(out_dir, "xla_cache")
    return s if "://" in s else os.path.abspath(os.path.expanduser(s))


def enable(setting: str | None, out_dir: str) -> str | None:
    """Turn the persistent compilation cache on as ``compile.cache_dir`` says (call before anything
    compiles; JAX creates the directory at the first compilation). Returns the directory in use (the environment's when ``JAX_COMPILATION_CACHE_DIR`` is
    set), or None when off."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    path = resolve_cache_dir(setting, out_dir)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("persistent compilation cache: %s", path)
    return path


def cache_dir() -> str | None:
    """The persistent cache directory JAX uses now (None: off)."""
    return jax.config.jax_compilation_cache_dir or None


@dataclasses.dataclass(frozen=True)
class CompileStats:
    compiles: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0

    def __sub__(self, other: CompileStats) -> CompileStats:
        return CompileStats(self.compiles - other.compiles, self.seconds - other.seconds,
                            self.cache_hits - other.cache_hits, self.cache_misses - other.cache_misses)

    def metrics(self, prefix: str = "", cache: bool = True) -> dict:
        """``compiles``, ``compile_s`` and, with ``cache``, ``compile_cache_hits`` / ``_misses``."""
        out = {f"{prefix}compiles": self.compiles, f"{prefix}compile_s": self.seconds}
        if cache:
            out.update({f"{prefix}compile_cache_hits": self.cache_hits,
                        f"{prefix}compile_cache_misses": self.cache_misses})
        return out

    def line(self) -> str:
        text = f"{self.compiles} compilations, {self.seconds:.1f} s"
        if self.cache_hits or self.cache_misses:
            text += f" (persistent cache: {self.cache_hits} hits, {self.cache_misses} misses)"
        return text


_lock = threading.Lock()
_totals = {"compiles": 0, "seconds": 0.0, "cache_hits": 0, "cache_misses": 0}
_registered = False


def _on_duration(event: str, duration: float, **_kw) -> None:
    if event == COMPILE_EVENT:
        with _lock:
            _totals["compiles"] += 1
            _totals["seconds"] += float(duration)


def _on_event(event: str, **_kw) -> None:
    key = "cache_hits" if event == CACHE_HIT_EVENT else "cache_misses" if event == CACHE_MISS_EVENT else None
    if key is not None:
        with _lock:
            _totals[key] += 1


def install() -> None:
    """Register the listeners (once per process)."""
    global _registered
    with _lock:
        if _registered:
            return
        monitoring.register_event_duration_secs_listener(_on_duration)
        monitoring.register_event_listener(_on_event)
        _registered = True


def totals() -> CompileStats:
    """Everything counted in this process since :func:`install`."""
    install()
    with _lock:
        return CompileStats(**_totals)


class CompileCounter:
    """Compilations since the previous :meth:`take` (or since construction)::

        c = CompileCounter()
        f(x)
        c.take().compiles  # programs built by f(x)
    """

    def __init__(self) -> None:
        install()
        self._mark = totals()

    def peek(self) -> CompileStats:
        return totals() - self._mark

    def take(self) -> CompileStats:
        now = totals()
        out, self._mark = now - self._mark, now
        return out
