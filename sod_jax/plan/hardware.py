"""Targets of a plan: TPU slices (compiled for with JAX's compile-only TPU client) and GPU counts
(an arithmetic estimate, or a real compile where those GPUs are present).

A target is written like a Cloud TPU accelerator type (``v5e-8``, ``v5p-16``, ``v6e-8``,
``v4-32``), a topology (``v5e:2x4``, ``v4:2x2x4``), a GPU count (``8xH100``) or ``cpu[:N]``
(this host's CPU devices; compiles for real, no chip memory to check against).

Accelerator-type names count what Google's docs count: TensorCores for v4 and v5p (two per chip,
one JAX device per chip in megacore mode), chips for v5e and v6e. So ``v4-32`` is 16 chips
(``v4:2x2x4``) and ``v5p-8`` is 4 chips (``v5p:2x2x1``).

Chip figures are the published per-chip peaks (dense bf16 FLOP/s, HBM bytes and bandwidth); the
memory the compiler lets a program use is read from the compiler itself where it can be
(:func:`usable_hbm_bytes`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Optional

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    """Published per-chip figures. ``peak_flops``: dense bf16 FLOP/s; ``hbm_bw``: bytes/s."""

    name: str
    kind: str  # "tpu" | "gpu" | "cpu"
    hbm_bytes: Optional[int]
    peak_flops: Optional[float]
    hbm_bw: Optional[float]
    source: str = ""


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1200e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM", "gpu", 80 * 10**9, 989e12, 3.35e12, "nvidia.com H100 datasheet (SXM, dense)"),
    "h200": Chip("NVIDIA H200 SXM", "gpu", 141 * 10**9, 989e12, 4.8e12, "nvidia.com H200 datasheet (SXM, dense)"),
    "a100": Chip("NVIDIA A100 80GB SXM", "gpu", 80 * 10**9, 312e12, 2.039e12, "nvidia.com A100 datasheet (dense)"),
    "cpu": Chip("CPU (this host)", "cpu", None, None, None, ""),
}

# Accelerator types whose number counts TensorCores (two per chip); the others count chips.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}
# JAX's default GPU allocator takes this fraction of a GPU's memory up front (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_DEFAULT_MEM_FRACTION = 0.75


class TargetError(ValueError):
    """A target name that cannot be planned for; the message says what is accepted."""


@dataclass(frozen=True)
class Target:
    """What to plan for: ``chips`` chips of ``chip`` as a ``topology`` (TPU), or a GPU/CPU count."""

    name: str  # as given, e.g. "v5e-8"
    family: str  # key of CHIPS
    chips: int
    topology: Optional[str] = None  # "v5e:2x4" (TPU only)

    @property
    def chip(self) -> Chip:
        return CHIPS[self.family]

    @property
    def kind(self) -> str:
        return self.chip.kind

    def describe(self) -> str:
        where = f" ({self.topology})" if self.topology else ""
        return f"{self.name}: {self.chips} x {self.chip.name}{where}"


def _grid(chips: int, dims: int) -> list[int]:
    """The slice shape Cloud TPU uses for ``chips`` chips: from 2x2 (x1), double the smallest
    dimension (the last of equal ones) until the product is reached."""
    if chips == 1:
        return [1] * dims
    if chips < 4 or chips & (chips - 1):
        raise TargetError(f"{chips} chips is not a slice shape the planner knows; give the topology, e.g. v5e:2x4")
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        if 1 in shape:
            shape[shape.index(1)] = 2
            continue
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return shape


def _family(text: str) -> str:
    key = _ALIASES.get(text.lower(), text.lower())
    if key not in _CORES_PER_CHIP:
        raise TargetError(f"unknown TPU generation '{text}': use v4, v5e, v5p or v6e")
    return key


def parse_target(text: str) -> Target:
    """``v5e-8`` / ``v4-32`` (accelerator types), ``v5e:2x4`` / ``v4:2x2x4`` (topologies),
    ``8xH100`` (GPU counts) or ``cpu`` / ``cpu:4`` (this host's CPU devices)."""
    s = text.strip()
    m = re.fullmatch(r"cpu(?::(\d+))?", s, re.I)
    if m:
        return Target(s, "cpu", int(m.group(1) or 0))
    m = re.fullmatch(r"(\d+)\s*x\s*([a-z]\d+)", s, re.I)
    if m:
        fam = m.group(2).lower()
        if CHIPS.get(fam, CHIPS["cpu"]).kind != "gpu":
            known = ", ".join(k.upper() for k, c in CHIPS.items() if c.kind == "gpu")
            raise TargetError(f"unknown GPU '{m.group(2)}' in '{s}': known {known}")
        return Target(s, fam, int(m.group(1)))
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", s, re.I)
    if m:
        fam = _family(m.group(1))
        cores = int(m.group(2))
        per = _CORES_PER_CHIP[fam]
        if cores % per:
            raise TargetError(f"{s}: {fam} accelerator types count TensorCores ({per} per chip); {cores} is not "
                              "a slice")
        chips = cores // per
        dims = 3 if fam in ("v4", "v5p") else 2
        return Target(s, fam, chips, f"{fam}:{'x'.join(map(str, _grid(chips, dims)))}")
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", s, re.I)
    if m:
        fam = _family(m.group(1))
        shape = [int(x) for x in m.group(2).split("x")]
        return Target(s, fam, math.prod(shape), f"{fam}:{m.group(2)}")
    raise TargetError(f"cannot read target '{s}': use an accelerator type (v5e-8, v5p-16, v6e-8, v4-32), a topology "
                      "(v5e:2x4, v4:2x2x4), a GPU count (8xH100) or cpu[:N]")


# ---------------------------------------------------------------------------------------------
# Devices to compile for
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to a temporary file for the block (libtpu's start-up writes warnings
    about the missing TPU VM environment there); the text is kept in ``captured[0]``."""
    captured = [""]
    fd = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(fd, 2)
            os.close(fd)
            tmp.seek(0)
            captured[0] = tmp.read().decode(errors="replace")


def tpu_available() -> Optional[str]:
    """None when the compile-only TPU client can be used here, else why not."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install -r requirements-dev.txt, or jax[tpu] of the installed jax version)"
    return None


def _host_bounds(t: Target) -> tuple[int, int, int]:
    """Chips per host: single-host 8-chip v5e/v6e machines, 4-chip hosts otherwise."""
    if t.chips == 1:
        return (1, 1, 1)
    if t.family in ("v5e", "v6e") and t.chips == 8:
        return (2, 4, 1)
    return (2, 2, 1)


def target_devices(t: Target) -> list:
    """The JAX devices to compile for: the TPU slice's compile-only devices (one per chip; v4 and v5p
    in megacore mode), the local GPUs (the real compile) or the local CPU devices."""
    import jax

    if t.kind == "cpu":
        devs = jax.devices("cpu")
        n = t.chips or len(devs)
        if n > len(devs):
            raise TargetError(f"{t.name}: {len(devs)} CPU devices here "
                              "(XLA_FLAGS=--xla_force_host_platform_device_count=N gives more)")
        return devs[:n]
    if t.kind == "gpu":
        devs = local_gpus()
        if len(devs) < t.chips:
            raise TargetError(f"{t.name}: {len(devs)} GPUs here")
        return devs[:t.chips]
    why = tpu_available()
    if why:
        raise TargetError(why)
    from jax.experimental import topologies

    kw = {"chip_config_name": "megacore"} if t.family in ("v4", "v5p") else {}
    # A compile-only client opens no TPU, so it needs none of libtpu's one-process-per-host lock; without
    # this, any other process that loaded libtpu (or a stale /tmp/libtpu_lockfile) makes it fail.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with quiet_stderr() as err:
        try:
            topo = topologies.get_topology_desc(topology_name=t.topology, platform="tpu",
                                                chips_per_host_bounds=_host_bounds(t), **kw)
        except Exception as e:  # noqa: BLE001 - libtpu reports bad shapes as runtime errors
            first = str(e).splitlines()[0]
            raise TargetError(f"{t.name}: the TPU client rejects topology {t.topology}: {first}") from None
    del err
    devs = list(topo.devices)
    if len(devs) != t.chips:
        raise TargetError(f"{t.name}: topology {t.topology} has {len(devs)} devices, expected {t.chips}")
    return devs


def local_gpus() -> list:
    """This host's GPUs (empty when there are none or JAX_PLATFORMS excludes them)."""
    import jax

    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def gpu_matches(t: Target, devices: list) -> bool:
    """The local GPUs are the target's (enough of them, the named model)."""
    if len(devices) < t.chips:
        return False
    kind = str(getattr(devices[0], "device_kind", "")).lower()
    return t.family in kind.replace(" ", "")


_HBM_RE = re.compile(r"exceeds available HBM \(([0-9.]+)([KMGT]?)\)")
_NEED_RE = re.compile(r"(?:required for [^(]*|total memory required[^(]*)\(([0-9.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[Optional[int], Optional[int]]:
    """(bytes the program needs, bytes available) from the compiler's RESOURCE_EXHAUSTED message."""
    need = _NEED_RE.search(message)
    have = _HBM_RE.search(message)
    conv = lambda m: None if m is None else int(float(m.group(1)) * _UNIT[m.group(2)])  # noqa: E731
    return conv(need), conv(have)


_USABLE: dict[tuple, int] = {}


def usable_hbm_bytes(t: Target, devices: list) -> Optional[int]:
    """Bytes of one chip the compiler lets a program use: read from the compiler's own
    out-of-memory message for a program that cannot fit (TPU), the allocator's limit (GPU), or the
    published HBM when neither says. None for CPU."""
    if t.kind == "cpu":
        return None
    if t.kind == "gpu":
        try:
            return int(devices[0].memory_stats()["bytes_limit"])
        except Exception:  # noqa: BLE001 - no allocator stats: the default preallocated fraction
            frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_DEFAULT_MEM_FRACTION))
            return int(t.chip.hbm_bytes * frac)
    key = (t.family,)
    if key not in _USABLE:
        import jax
        import jax.numpy as jnp

        sharding = jax.sharding.SingleDeviceSharding(devices[0])
        big = jax.ShapeDtypeStruct((4 * t.chip.hbm_bytes,), jnp.int8, sharding=sharding)
        value = t.chip.hbm_bytes
        with quiet_stderr():
            try:
                jax.jit(lambda x: x + 1).lower(big).compile()
            except Exception as e:  # noqa: BLE001 - the expected out-of-memory error carries the figure
                value = parse_oom(str(e))[1] or value
        _USABLE[key] = value
    return _USABLE[key]


__all__ = ["CHIPS", "Chip", "GiB", "Target", "TargetError", "gpu_matches", "local_gpus", "parse_oom", "parse_target",
           "quiet_stderr", "target_devices", "tpu_available", "usable_hbm_bytes"]
