"""The engine's sizes, as plain functions of the config: the ladders every device call's shapes
are padded to (so the compiled program set stays small and fixed), and the KV cache's bytes per
device and its budget check (what the trainer and the evaluation run before any cache exists)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from sod_jax.models.qwen3 import Qwen3Config


def window_ladder(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """The cache windows a call may read: powers of two from ``smallest`` below ``max_len``, then
    ``max_len`` (a few ``lax.switch`` branches; a read never exceeds twice what it needs)."""
    out, w = [], smallest
    while w < max_len:
        out.append(w)
        w *= 2
    return tuple(out) + (max_len,)


def row_ladder(num_slots: int) -> tuple[int, ...]:
    """The row counts a call is padded to: 1, 4, 16, ... below ``num_slots``, then ``num_slots``
    (padding costs at most 4x the rows of a small call; the set of shapes stays small)."""
    out, n = [], 1
    while n < num_slots:
        out.append(n)
        n *= 4
    return tuple(out) + (num_slots,)


def pad_to(n: int, ladder: Sequence[int]) -> int:
    """The smallest entry of ``ladder`` >= n (the last one when none is)."""
    return next((x for x in ladder if x >= n), ladder[-1])


def length_bucket(n: int, buckets: Sequence[int], limit: int) -> int:
    """Padded length for ``n`` tokens: the smallest bucket >= n, beyond the largest the largest times
    a power of two; never more than ``limit`` (nor less than n)."""
    b = next((b for b in buckets if b >= n), None)
    if b is None:
        b = buckets[-1] if buckets else n
        while b < n:
            b *= 2
    return max(n, min(b, limit))


def kv_cache_bytes(cfg: Qwen3Config, num_slots: int, max_len: int, dtype: Any, devices: int = 1) -> int:
    """Per device: slots / devices (the slots are split over ``devices``) x max_len x layers x
    kv_heads x head_dim x 2 (k and v) x bytes per element."""
    return (-(-num_slots // devices) * max_len * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
            * jnp.dtype(dtype).itemsize)


def slot_devices(num_slots: int, mesh_shape: dict) -> int:
    """The devices a cache of ``num_slots`` slots is split over on a mesh of ``mesh_shape`` (axis ->
    size): the ``data`` x ``fsdp`` devices (the sampling copy does not use them) when they divide the
    slots, else 1 (every device holds every slot)."""
    d = int(mesh_shape.get("data", 1)) * int(mesh_shape.get("fsdp", 1))
    return d if d > 1 and num_slots % d == 0 else 1


def kv_budget_problem(cfg: Qwen3Config, num_slots: int, max_len: int, dtype: Any, budget_bytes: Optional[int],
                      budget_source: str = "rollout.kv_cache_budget_gb", min_slots: int = 1,
                      devices: int = 1) -> Optional[str]:
    """None when ``num_slots`` slots of ``max_len`` tokens, split over ``devices``, fit ``budget_bytes``
    per device (None: no budget), else the one-line message: what the cache needs per device, the
    budget, and the largest ``rollout.num_slots`` (a multiple of ``devices``, at least ``min_slots``,
    e.g. ``rollout.n``) that fits, or that none does."""
    need = kv_cache_bytes(cfg, num_slots, max_len, dtype, devices)
    if not budget_bytes or need <= budget_bytes:
        return None
    item = jnp.dtype(dtype).itemsize
    fit = budget_bytes // kv_cache_bytes(cfg, 1, max_len, dtype) * devices
    split = f" per device ({devices} devices: {-(-num_slots // devices)} slots each)" if devices > 1 else ""
    head = (f"KV cache needs {need / 2**30:.2f} GiB{split} (rollout.num_slots={num_slots} slots x {max_len} tokens x "
            f"{cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} kv heads x {cfg.head_dim} x 2 x {item} B) "
            f"but {budget_source} is {budget_bytes / 2**30:.2f} GiB")
    if fit >= max(min_slots, 1):
        fix = (f"the largest rollout.num_slots that fits is {fit}: set rollout.num_slots={fit} (or shorten the slots, "
               "rollout.max_response_length + data.max_prompt_length, or raise rollout.kv_cache_budget_gb)")
    else:
        fix = (f"no rollout.num_slots >= {max(min_slots, 1)} fits ({fit} would): shorten the slots "
               "(rollout.max_response_length + data.max_prompt_length), use a smaller cache dtype (model.dtype "
               "bfloat16) or raise rollout.kv_cache_budget_gb")
    return f"{head}; {fix}"


def device_memory_bytes(device: Any = None) -> Optional[int]:
    """Memory of one accelerator (``bytes_limit`` of its allocator), None where unknown (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


DEFAULT_BUDGET_SOURCE = "90% of the device's memory less the sampling weights (rollout.kv_cache_budget_gb=0)"


def default_kv_budget_bytes(weight_bytes: int, fraction: float = 0.9, device: Any = None) -> Optional[int]:
    """KV budget when ``rollout.kv_cache_budget_gb`` is 0: ``fraction`` of one device's memory minus
    the sampling copy of the weights; None (no check) where the device reports no memory limit."""
    total = device_memory_bytes(device)
    return None if total is None else max(int(total * fraction) - weight_bytes, 0)
