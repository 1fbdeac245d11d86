"""Compiled programs kept per call signature, so a run can compile its whole program set up front.

A :class:`Program` wraps one jitted function. A call looks up the executable compiled for the
call's *signature* (the static arguments, the pytree structure and every leaf's shape and dtype)
and runs it; a signature not seen before is compiled then (a *late* compile, counted in
:attr:`Program.late`). :meth:`Program.compile` builds a signature's executable from abstract inputs
(``jax.ShapeDtypeStruct`` with shardings) without running or allocating anything: that is the
warm-up (:func:`warm_up`) and the planner's compile.

Why not plain ``jax.jit``: an executable from ``jit(f).lower(...).compile()`` is not seen by
``jit(f)(...)``'s own cache, so a warm-up through ``jit`` would compile every program twice.

A :class:`Call` is one entry of an enumerated program set: a program, abstract arguments and static
arguments. The engine (:meth:`sod_jax.rollout.engine.Engine.program_calls`) and the RL trainer list
theirs from the config, so the set is known (and counted) before step 1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

log = logging.getLogger("sod_jax.compile")


def _leaf_key(x: Any) -> tuple:
    if x is None:
        return (None,)
    if isinstance(x, (int, float, bool)) and not isinstance(x, np.generic):
        return ("py", type(x).__name__)  # a weakly typed scalar
    shape = x.shape if hasattr(x, "shape") else np.shape(x)
    dtype = getattr(x, "dtype", None)
    return (tuple(shape), str(np.dtype(dtype)) if dtype is not None else type(x).__name__,
            bool(getattr(x, "weak_type", False)))


def signature(args: Sequence[Any], statics: dict) -> tuple:
    """What decides the compiled program of a call: statics, tree structure, leaf shapes and dtypes
    (shardings are fixed per program's life; a call whose shardings differ is recompiled)."""
    leaves, tree = jax.tree.flatten(tuple(args), is_leaf=lambda x: x is None)
    return tuple(sorted(statics.items())), tree, tuple(_leaf_key(x) for x in leaves)


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` (with the sharding of committed arrays) for every array leaf."""

    def one(x):
        if x is None or isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = getattr(x, "sharding", None) if getattr(x, "committed", False) else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


class Program:
    """One jitted function and its executables by call signature (see the module docstring)."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        self.compiled: dict[tuple, Any] = {}
        self.late = 0  # signatures compiled at call time (not by compile / a warm-up)
        self.warm = False  # set by warm_up: late compiles are then logged as such

    def lower(self, *args: Any, **statics: Any) -> Any:
        return self.fn.lower(*args, **statics)

    def compile(self, *args: Any, **statics: Any) -> Any:
        """The executable for this signature (compiled from ``args``, abstract or concrete, if new)."""
        key = signature(args, statics)
        exe = self.compiled.get(key)
        if exe is None:
            exe = self.compiled[key] = self.fn.lower(*args, **statics).compile()
        return exe

    def __call__(self, *args: Any, **statics: Any) -> Any:
        key = signature(args, statics)
        exe = self.compiled.get(key)
        if exe is None:
            self.late += 1
            if self.warm:
                log.warning("program %s compiled during the run (not in the warmed-up set): %s", self.name,
                            _describe(args, statics))
            exe = self.compiled[key] = self.fn.lower(*args, **statics).compile()
        try:
            return exe(*args)
        except (TypeError, ValueError) as e:  # the same shapes on other shardings (e.g. a new mesh)
            if "sharding" not in str(e).lower() and "device" not in str(e).lower():
                raise
            self.late += 1
            exe = self.compiled[key] = self.fn.lower(*args, **statics).compile()
            return exe(*args)


def _describe(args: Sequence[Any], statics: dict) -> str:
    shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(tuple(args))[:8] if hasattr(x, "shape")]
    return f"statics={statics} shapes={shapes}{' ...' if len(jax.tree.leaves(tuple(args))) > 8 else ''}"


@dataclass
class Call:
    """One program of an enumerated set: ``program.compile(*args, **statics)`` builds it."""

    program: Program
    args: tuple
    statics: dict = field(default_factory=dict)
    label: str = ""

    def key(self) -> tuple:
        return (self.program.name,) + signature(self.args, self.statics)

    def compile(self) -> Any:
        return self.program.compile(*self.args, **self.statics)

    def lower(self) -> Any:
        return self.program.lower(*self.args, **self.statics)


def unique(calls: Iterable[Call]) -> list[Call]:
    """``calls`` without repeated signatures (order kept)."""
    seen, out = set(), []
    for c in calls:
        k = c.key()
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def count_by_program(calls: Iterable[Call]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in unique(calls):
        out[c.program.name] = out.get(c.program.name, 0) + 1
    return out


def warm_up(calls: Iterable[Call], progress: bool = False, say: Optional[Callable[[str], None]] = None) -> float:
    """Compile every program of ``calls`` (abstract inputs: nothing runs, nothing is allocated) and
    mark their programs warm. Returns the seconds it took. ``progress``: a tqdm bar."""
    calls = unique(calls)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(calls), desc="compiling", unit="program", dynamic_ncols=True)
    for c in calls:
        c.compile()
        c.program.warm = True
        if bar is not None:
            bar.set_postfix_str(c.label or c.program.name, refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if say is not None:
        by = ", ".join(f"{n} {k}" for n, k in count_by_program(calls).items())
        say(f"warm-up: compiled {len(calls)} programs in {seconds:.1f} s ({by})")
    return seconds
