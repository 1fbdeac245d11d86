"""Device mesh, logical-axis sharding rules, and placement helpers.

Mesh axes: ``data`` (replicated params, split batch), ``fsdp`` (params sharded on their ``embed``
axis, batch split too) and ``tensor`` (heads, mlp and vocab axes split). Parameters name their
dimensions with logical axes (``("layers", "embed", "heads", "head_dim")``); :data:`DEFAULT_RULES`
map each logical name to mesh axes for training, :data:`SAMPLING_RULES` for the rollout engine's
sampling copy of the weights. A mesh axis that does not divide a dimension (e.g. 1 kv head
over tensor=2) is dropped for that dimension, so any model runs on any mesh, just less sharded.

Activation constraints (:func:`constrain`) read JAX's own mesh context (``jax.set_mesh``, which
:func:`use_mesh` enters): a jitted function called under a mesh is traced with its constraints,
the same function called without one is traced (and cached) separately without them, because the
context mesh is part of jit's cache key. Model code therefore runs unchanged on one device.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

AxisRule = tuple[str, Union[None, str, tuple[str, ...]]]

DEFAULT_RULES: tuple[AxisRule, ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("seq", None),
)

# The rollout engine's sampling copy of the weights: the training rules without fsdp for parameters
# (``embed`` replicated), so decode reads whole weights with no all-gather of fsdp shards; tensor
# parallelism (heads, mlp, vocab) is kept.
SAMPLING_RULES: tuple[AxisRule, ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("seq", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Fill the one ``-1`` entry so that data * fsdp * tensor == n_devices; explain any mismatch."""
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError("at most one of mesh.data/fsdp/tensor may be -1")
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices cannot be split with "
                             f"data={data}, fsdp={fsdp}, tensor={tensor} (product of the fixed axes {known} "
                             f"does not divide {n_devices})")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {n_devices} devices are available; "
                         "set one of mesh.data/fsdp/tensor to -1 to fill")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all). ``tensor`` is innermost so
    tensor-parallel collectives stay within the fastest links.

    The device grid follows the hardware: JAX's ``mesh_utils.create_device_mesh`` (the TPU torus
    order within a slice) and, across several TPU slices, ``create_hybrid_device_mesh`` with the
    slices along ``data`` (only data-parallel traffic crosses the slower DCN links). Each host's
    devices stay a contiguous block (the host-local sampling mesh, :func:`local_mesh`, needs that);
    where the helpers cannot place the shape, the devices are used in order (process by process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return Mesh(_device_grid(shape, devices), MESH_AXES)


def _device_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    if len({d.process_index for d in devices}) > 1:  # each host's devices a contiguous block
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    plain = np.asarray(devices, dtype=object).reshape(shape)
    if devices[0].platform != "tpu":
        return plain
    from jax.experimental import mesh_utils

    try:
        slices = len({getattr(d, "slice_index", 0) for d in devices})
        if slices > 1 and shape[0] % slices == 0:
            grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1], shape[2]), (slices, 1, 1),
                                                        devices)
        else:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return plain
    try:  # the host-local sampling mesh must exist on every process
        for p in {d.process_index for d in devices}:
            local_mesh(Mesh(grid, MESH_AXES), p)
    except LocalMeshError:
        return plain
    return grid


def mesh_from_config(mesh_cfg: Any, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Build the mesh of a :class:`sod_jax.config.MeshConfig`."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)


class LocalMeshError(ValueError):
    """This process's devices do not form a sub-mesh the sampling layout can use."""


def local_mesh(mesh: Mesh, process_index: Optional[int] = None) -> Mesh:
    """The part of ``mesh`` on this process's devices, with the same axis names: the host-local mesh
    the rollout engine samples on (no collective crosses hosts, so hosts may issue different
    numbers of engine calls). This process's devices must form a box of the mesh that spans the
    whole ``tensor`` axis (a tensor-parallel group split across hosts would need cross-host
    collectives in every decode step): :class:`LocalMeshError` otherwise, naming the axis."""
    p = jax.process_index() if process_index is None else process_index
    devs = mesh.devices
    mine = np.vectorize(lambda d: d.process_index == p)(devs)
    if mine.all():
        return mesh
    idx = [sorted(set(np.nonzero(mine)[i].tolist())) for i in range(devs.ndim)]
    box = devs[np.ix_(*idx)]
    if box.size != int(mine.sum()) or not all(d.process_index == p for d in box.flat):
        raise LocalMeshError(f"process {p}'s devices are not a contiguous block of the mesh "
                             f"{dict(mesh.shape)}; order the devices host by host")
    for name, ix in zip(mesh.axis_names, idx):
        if name == "tensor" and len(ix) != mesh.shape[name]:
            raise LocalMeshError(f"mesh.tensor={mesh.shape[name]} spans processes ({len(ix)} of its devices are on "
                                 f"process {p}): the rollout engine samples on each host's own devices, so set "
                                 f"mesh.tensor to at most the devices per host ({jax.local_device_count()})")
    return Mesh(box, mesh.axis_names)


def to_local(array: jax.Array, mesh: Mesh) -> jax.Array:
    """``array`` (laid out on a global mesh so that each of this process's devices holds the shard a
    device at the same place of the host-local ``mesh`` needs, e.g. replicated over the axes that
    cross hosts) as an array on ``mesh``: the same device buffers, no copy."""
    sharding = array.sharding
    if not isinstance(sharding, NamedSharding) or sharding.mesh.devices.shape == mesh.devices.shape and \
            (sharding.mesh.devices == mesh.devices).all():
        return array
    local = NamedSharding(mesh, sharding.spec)
    by_device = {s.device: s.data for s in array.addressable_shards}
    return jax.make_array_from_single_device_arrays(array.shape, local, [by_device[d] for d in mesh.devices.flat])


def logical_to_spec(
    axes: Sequence[Optional[str]],
    shape: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    rules: Sequence[AxisRule] = DEFAULT_RULES,
) -> P:
    """PartitionSpec of a tensor whose dims are named ``axes``.

    With ``shape`` and ``mesh``, a mesh axis is kept for a dimension only if the dimension's size is
    divisible by it; a mesh axis is never used twice, and size-1 mesh axes are dropped.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = [] if target is None else ([target] if isinstance(target, str) else list(target))
        kept = []
        for ax in mesh_axes:
            if ax in used:
                continue
            if mesh is not None:
                size = mesh.shape[ax]
                if size == 1:
                    continue
                if shape is not None and shape[i] % (math.prod(mesh.shape[a] for a in kept) * size):
                    continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _logical_axes(var: Any) -> Optional[tuple]:
    try:
        return var.get_metadata().get("logical_axes")
    except AttributeError:
        return None


def param_specs(state: Any, mesh: Mesh, rules: Sequence[AxisRule] = DEFAULT_RULES) -> Any:
    """PartitionSpecs for an nnx ``State``, with the same tree structure (each Variable holds its spec;
    variables without logical axes are replicated)."""

    def spec(var):
        axes = _logical_axes(var)
        return var.replace(P() if axes is None else logical_to_spec(axes, var.shape, mesh, rules))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: Any, mesh: Mesh, rules: Sequence[AxisRule] = DEFAULT_RULES) -> Any:
    """Tree of NamedShardings matching an nnx ``State``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def shard_module(module: Any, mesh: Mesh, rules: Sequence[AxisRule] = DEFAULT_RULES) -> Any:
    """Move an nnx module's variables to the shardings their logical axes name (in place)."""

    state = nnx.state(module)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def batch_spec(ndim: int, rules: Sequence[AxisRule] = DEFAULT_RULES) -> P:
    """Batch-major arrays: the leading axis is split over the batch mesh axes."""
    return P(dict(rules)["batch"], *([None] * (ndim - 1)))


def place_rows(tree: Any, mesh: Optional[Mesh], *, row_axis: int = 0, process_local: bool = False,
               rules: Sequence[AxisRule] = DEFAULT_RULES) -> Any:
    """Place a pytree of host arrays on ``mesh`` with axis ``row_axis`` (the rows: ``0`` for
    ``[B, ...]``, ``1`` for micro-batched ``[A, R, L]``; negative counts from the end) split over the
    batch mesh axes (``data`` x ``fsdp``, dropping one that does not divide the rows); every other
    axis is replicated. The one batch placement of the RL and SFT loops.

    ``process_local=False``: every process passes the *whole* batch (the same arrays) and
    contributes the shards of its own devices. ``process_local=True``: each process passes only
    *its own* rows, arrays of the same shape on every process; the global batch is their
    concatenation in process order along ``row_axis`` (``jax.make_array_from_process_local_data``).
    Without a mesh the arrays go to the default device unchanged (``jnp.asarray``). ``None`` leaves
    stay ``None``.
    """
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)

    def put(a):
        a = np.asarray(a)
        axes = [None] * a.ndim
        axes[row_axis % a.ndim] = "batch"
        if process_local:
            # The global shape is inferred: local rows x the number of processes the batch axes span.
            return jax.make_array_from_process_local_data(NamedSharding(mesh, logical_to_spec(axes, None, mesh, rules)),
                                                          a)
        sharding = NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh, rules))
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def put_batch(x: Any, mesh: Mesh, rules: Sequence[AxisRule] = DEFAULT_RULES, *,
              process_local: Optional[bool] = None) -> Any:
    """:func:`place_rows` of batch-major arrays (the leading axis split over ``data`` x ``fsdp``),
    from per-process rows in a multi-process run: ``process_local`` defaults to
    ``jax.process_count() > 1`` (each process passes only *its own* rows; in a single process the
    arrays are the whole batch)."""
    if process_local is None:
        process_local = jax.process_count() > 1
    return place_rows(x, mesh, row_axis=0, process_local=process_local, rules=rules)


def use_mesh(mesh: Mesh):
    """Context manager that makes ``mesh`` JAX's current mesh (``jax.set_mesh``) for the block.
    Enter it around *calls* of jitted functions (it cannot be entered while tracing); activation
    constraints of everything traced inside then follow :data:`DEFAULT_RULES` on this mesh."""
    return jax.set_mesh(mesh)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes on JAX's current mesh; identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, DEFAULT_RULES)
    manual = set(getattr(mesh, "manual_axes", ()))
    if manual:  # inside a shard_map: its manual axes are already split, only the automatic ones remain
        keep = lambda e: (e if e not in manual else None) if not isinstance(e, tuple) else (  # noqa: E731
            tuple(a for a in e if a not in manual) or None)
        spec = jax.sharding.PartitionSpec(*(keep(e) for e in spec))
    return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------------------------
# Multi-controller start-up (DESIGN §4 Scale-out): every CLI that computes calls start_distributed
# first, so that each host of a pod or SLURM job joins one run instead of being its own process 0.
# ---------------------------------------------------------------------------------------------
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_TPU_HOST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_MEGASCALE_VARS = ("MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES")


class DistributedStartupError(RuntimeError):
    """Cluster variables are present but the start-up did not give a multi-process run."""


def _int_env(env: Any, name: str) -> Optional[int]:
    try:
        return int(env[name]) if env.get(name, "").strip() else None
    except ValueError:
        return None


def detect_cluster(env: Any = None) -> Optional[dict]:
    """The multi-process cluster this process runs in, from environment variables alone (no
    network, no JAX initialisation): ``{"kind", "num_processes" (int or None: unknown), "vars"
    (the names seen)}``, or None for a single process. The variables are those JAX's own cluster
    detection reads (``jax/_src/clusters``: SLURM under ``srun``, TPU VM slices and multislice)
    plus ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` for any launcher.
    A GCE TPU pod that sets no variable is found by :func:`_jax_tpu_vm_process_count` instead."""
    import os

    env = os.environ if env is None else env
    seen = [v for v in _JAX_VARS if env.get(v)]
    if seen:
        n = _int_env(env, "JAX_NUM_PROCESSES")
        return None if n == 1 else {"kind": "jax-env", "num_processes": n, "vars": seen}
    if all(v in env for v in _SLURM_VARS):
        n = _int_env(env, "SLURM_NTASKS")
        if n is not None and n > 1:
            return {"kind": "slurm", "num_processes": n, "vars": [v for v in _SLURM_VARS]}
    tpu = [v for v in _TPU_HOST_VARS if env.get(v)]
    mega = [v for v in _MEGASCALE_VARS if env.get(v)]
    hosts = len([h for h in env.get(tpu[0], "").split(",") if h.strip()]) if tpu else 1
    slices = _int_env(env, "MEGASCALE_NUM_SLICES") or 1
    if hosts * slices > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in mega:
        n = hosts * slices if (tpu or "MEGASCALE_NUM_SLICES" in mega) else None
        return {"kind": "tpu", "num_processes": n, "vars": tpu + mega}
    return None


def joins_cluster(dist_cfg: Any = None, env: Any = None) -> bool:
    """:func:`start_distributed` would start a multi-process job (the same decision, nothing started)."""
    if jax.distributed.is_initialized():
        return False
    n = getattr(dist_cfg, "num_processes", None)
    if n:
        return n > 1
    if detect_cluster(env) is not None:
        return True
    n_tpu = _jax_tpu_vm_process_count()
    return n_tpu is not None and n_tpu > 1


def process_index() -> int:
    return jax.process_index()


def coordinator_address() -> Optional[str]:
    """host:port of the coordination service this process joined (None when it joined none)."""
    from jax._src import distributed

    return getattr(distributed.global_state, "coordinator_address", None)


def _jax_tpu_vm_process_count() -> Optional[int]:
    """Process count of a Cloud TPU VM slice as JAX's own detection sees it (the GCE metadata
    server), or None when not on a TPU VM or it cannot tell. Uses private JAX APIs
    (``jax._src.clusters``, checked against jax 0.10); any change there reads as None."""
    try:
        from jax._src.clusters import cloud_tpu_cluster as ct

        if not ct.running_in_cloud_tpu_vm:
            return None
        for env_cls in (ct.GkeTpuCluster, ct.GceTpuCluster):
            if env_cls.is_env_present():
                return int(env_cls.get_process_count())
    except Exception:  # noqa: BLE001 - a private API: anything unexpected means "cannot tell"
        return None
    return None


def _initialize_kwargs(**kw: Any) -> dict:
    """``kw`` minus None values and the names this jax's ``jax.distributed.initialize`` lacks."""
    import inspect

    params = inspect.signature(jax.distributed.initialize).parameters
    return {k: v for k, v in kw.items() if v is not None and k in params}


def start_distributed(dist_cfg: Any = None, env: Any = None) -> dict:
    """Multi-controller start-up, before any other JAX work; call it from every CLI that computes.

    Explicit ``distributed.coordinator / num_processes / process_id`` win; otherwise a detected
    cluster (:func:`detect_cluster`, or a TPU VM slice of more than one host) starts
    ``jax.distributed.initialize`` with JAX's own detection, ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` filling what it does not read. ``distributed.num_processes: 1`` forces a
    single process. Idempotent: a second call, or one after JAX was initialised elsewhere, does
    nothing. Raises :class:`DistributedStartupError` (one line naming the variables seen) when a
    cluster was detected but JAX reports a single process afterwards. Returns what it did:
    ``{"initialized": bool, "kind": str | None, "vars": [...]}``.
    """
    import os

    env = os.environ if env is None else env
    coordinator = getattr(dist_cfg, "coordinator", None)
    num_processes = getattr(dist_cfg, "num_processes", None)
    process_id = getattr(dist_cfg, "process_id", None)
    timeouts = dict(initialization_timeout=getattr(dist_cfg, "initialization_timeout", None),
                    heartbeat_timeout_seconds=getattr(dist_cfg, "heartbeat_timeout", None),
                    shutdown_timeout_seconds=getattr(dist_cfg, "shutdown_timeout", None))
    if jax.distributed.is_initialized():
        return {"initialized": False, "kind": "already", "vars": []}
    if num_processes == 1:
        return {"initialized": False, "kind": None, "vars": []}
    found = None if num_processes else detect_cluster(env)
    if not num_processes and found is None:
        n_tpu = _jax_tpu_vm_process_count()
        if n_tpu is None or n_tpu <= 1:
            return {"initialized": False, "kind": None, "vars": []}
        found = {"kind": "tpu-vm", "num_processes": n_tpu, "vars": ["GCE TPU metadata"]}
    kind = "config" if num_processes else found["kind"]
    seen = ["distributed.num_processes"] if num_processes else list(found["vars"])
    if not num_processes and found["kind"] == "jax-env":
        # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count / id.
        num_processes = _int_env(env, "JAX_NUM_PROCESSES")
        process_id = _int_env(env, "JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(**_initialize_kwargs(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id, **timeouts))
    except (ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise DistributedStartupError(f"jax.distributed.initialize failed ({kind}: {', '.join(seen)}): {msg}") from None
    if jax.process_count() == 1:
        raise DistributedStartupError(
            f"distributed start-up ({kind}: {', '.join(seen)}) left jax.process_count() == 1; "
            "every host would run as its own process 0 and write the same out_dir (set distributed.num_processes=1 "
            "to run one process on purpose, or unset the cluster variables)")
    return {"initialized": True, "kind": kind, "vars": seen}



def lost_peers(timeout_s: float = 5.0) -> str:
    """Which processes of a multi-process job are gone, for an error message after a failed
    collective: the processes the coordination service no longer sees (asked with a short timeout),
    or that the coordination service itself (on process 0) is unreachable."""
    from jax._src import distributed

    client = distributed.global_state.client
    n = jax.process_count()
    if client is None or n == 1:
        return "no peer (single process)"
    try:
        live = set(client.get_live_nodes(list(range(n))))
    except Exception:  # noqa: BLE001 - the coordinator itself is gone
        return "process 0 (it runs the coordination service, which no longer answers)"
    gone = [i for i in range(n) if i not in live]
    return ("process " + ", ".join(map(str, gone))) if gone else "no process is reported dead (a network error?)"


_gather_calls = 0


def all_gather_json(obj: Any, timeout_s: int = 600) -> list:
    """``obj`` (JSON-able) of every process, in process order, on every process: through the
    coordination service's key-value store (no device program, nothing to compile). Every process
    must call it the same number of times in the same order. A single process gets ``[obj]``."""
    global _gather_calls
    n = jax.process_count()
    if n == 1:
        return [obj]
    import json

    from jax._src import distributed

    client = distributed.global_state.client
    _gather_calls += 1
    tag = f"sod_jax/gather/{_gather_calls}"
    client.key_value_set(f"{tag}/{jax.process_index()}", json.dumps(obj))
    out = [json.loads(client.blocking_key_value_get(f"{tag}/{p}", timeout_s * 1000)) for p in range(n)]
    client.wait_at_barrier(f"{tag}/read", timeout_s * 1000)  # everyone has read: the keys can go
    client.key_value_delete(f"{tag}/{jax.process_index()}")
    return out
