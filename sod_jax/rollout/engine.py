"""Slot-based rollout engine: KV cache, prefill, insert, multi-token decode, cache extension.

A fixed number of decode *slots* each own one row of the KV cache: per layer, keys
``[slots, K, H, M]`` and values ``[slots, K, M, H]`` (M = ``max_len``). The cache is allocated
once, when the first request arrives, and freed when every slot is free again (so it is not
resident during the trainer's update). A device call reads only a *window* of it, the shortest of a
static ladder (:func:`~sod_jax.rollout.sizes.window_ladder`) that holds every live position, chosen on device
(:class:`~sod_jax.models.qwen3.CacheRead`): the cache length is never a compiled shape.

* :meth:`Engine.prefill` runs a prompt (padded to a length bucket) into a standalone cache row and
  returns it with the next-token logits.
* :meth:`Engine.insert` copies that row into one or many slots at once (a GRPO group shares one
  prefill) and samples each slot's first token with the slot's own key.
* :meth:`Engine.step` advances every live slot ``decode_steps`` tokens in ONE device call (a
  ``lax.while_loop`` that ends early once no slot is active); stop ids, per-slot token budgets and
  the cache length are checked on device, so the host syncs once per call, not per token. Two
  plans bound what stragglers cost, both made on the host from its length and budget bounds:
  *ragged reads* (only the ``tail_slots`` longest slots read the window that holds them; the others
  read the window that holds the rest) and *compact decode* (when at most a quarter of the slots can
  still generate, only those are gathered and decoded). With the slots split over device groups
  both plans are made per group and every decode and extension program runs per group (a
  ``shard_map`` over the slot axes): no cache row crosses devices.
* :meth:`Engine.extend_many` appends tokens (tool responses) to finished slots' cache rows without
  re-running their context and samples each one's next token, one device call per tool-text
  bucket: the multi-turn agent's fast path.
Whole requests run through :func:`sod_jax.rollout.scheduler.generate` (continuous batching on the
agent's :class:`~sod_jax.rollout.scheduler.SlotScheduler`, which drives this engine): finished slots
are freed and refilled from the queue while the others keep decoding.

**A bounded program set.** Every shape a device call sees comes from a short ladder fixed by the
config, never from the data: row counts (prompts in a prefill, slots in an insert or extension)
are padded to :func:`~sod_jax.rollout.sizes.row_ladder` (1, 4, 16, ... up to the slot count), prompt and tool-text
lengths to their buckets, decode batches to S, S/4, S/16, ...; the sampling mode is one per call.
:meth:`Engine.program_calls` lists every program a run's phases can call, with abstract inputs,
for a warm-up that compiles them all before step 1 (:mod:`sod_jax.programs`) and for the planner.

Every device function runs the model's one forward (:func:`sod_jax.models.qwen3.forward`) with a
:class:`~sod_jax.models.qwen3.KVCache`; this module owns only the cache layout, slot state and the
host-side bookkeeping. The weights are the engine's own sampling copy (see :class:`Engine`).

Every generated token comes with its log-prob under the raw policy (temperature 1, no filtering).
The last token a slot generated is *pending*: it is not in the cache until the next decode step or
:meth:`extend` writes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sod_jax import parallel
from sod_jax.models.qwen3 import CacheRead, CacheWrite, KVCache, Qwen3, Qwen3Config, as_dtype, forward, lm_logits
from sod_jax.programs import Call, Program, abstract
from sod_jax.rollout.sampling import SamplingParams, mode_of, request_key, sample, token_keys, widest_mode
from sod_jax.rollout.sizes import (
    DEFAULT_BUDGET_SOURCE,
    default_kv_budget_bytes,
    kv_budget_problem,
    kv_cache_bytes,
    length_bucket,
    pad_to,
    row_ladder,
    slot_devices,
    window_ladder,
)

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot serve; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------
# Device state and pure device functions
# ---------------------------------------------------------------------------------------------


class SlotState(NamedTuple):
    """Everything the device keeps per slot. S = slots, M = max_len (positions a slot holds)."""

    k: tuple  # per layer [S, K, H, M] keys, positions last: q.k^T is then a plain matmul per head
    v: tuple  # per layer [S, K, M, H] values (heads before positions: p.v reads it in place)
    lengths: jax.Array  # [S] int32 tokens in the cache
    next_token: jax.Array  # [S] int32 last generated token (pending: not yet in the cache)
    counters: jax.Array  # [S] int32 tokens generated by this sample so far (key fold index)
    remaining: jax.Array  # [S] int32 tokens the slot may still generate
    active: jax.Array  # [S] bool still decoding
    base_keys: jax.Array  # [S, 2] uint32 request key of the sample in the slot
    temperature: jax.Array  # [S] float32
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] float32
    greedy: jax.Array  # [S] bool


EXTEND_CHUNK = 128  # tokens of a tool turn attended per scan step of an extension


def _extend_chunk(width: int) -> int:
    """Tokens per scan step of an extension ``width`` wide: EXTEND_CHUNK when it divides the width."""
    return EXTEND_CHUNK if width > EXTEND_CHUNK and width % EXTEND_CHUNK == 0 else width


def _last_logits(cfg: Qwen3Config, w: dict, h: jax.Array, n_valid: jax.Array) -> jax.Array:
    """Next-token logits ``[B, V]`` after each row's last real token of ``h [B, T, D]``."""
    last = jnp.take_along_axis(h, (n_valid - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return lm_logits(cfg, w, last)


def _decode_one(cfg: Qwen3Config, w: dict, st: SlotState, stop_ids: jax.Array, mode: str, max_len: int,
                read: CacheRead):
    """Feed every active slot's pending token (one cached :func:`forward` step), sample the next one.
    Returns new state and (token [S], logprob [S], emitted [S]). The caller guarantees every active
    slot stays inside the window ``read`` gives it during the call; ``max_len`` is the slot length a
    sample may reach."""
    pos = st.lengths  # where the pending token goes
    act = st.active
    h, cache = forward(cfg, w, st.next_token[:, None], pos[:, None], cache=KVCache(st.k, st.v),
                       write=CacheWrite(None, pos, act[:, None], read))
    logits = lm_logits(cfg, w, h[:, 0])
    with jax.named_scope("sample"):
        tok, lp = sample(logits, token_keys(st.base_keys, st.counters), st.temperature, st.top_k, st.top_p,
                         st.greedy, mode)
    lengths = jnp.where(act, pos + 1, st.lengths)
    remaining = jnp.where(act, st.remaining - 1, st.remaining)
    stopped = jnp.isin(tok, stop_ids) | (remaining <= 0) | (lengths >= max_len)
    st = st._replace(k=cache.k, v=cache.v, lengths=lengths, remaining=remaining,
                     next_token=jnp.where(act, tok, st.next_token),
                     counters=jnp.where(act, st.counters + 1, st.counters),
                     active=act & ~stopped)
    return st, (tok, lp, act)


def _mesh_of(model: Qwen3) -> Any:
    """The mesh the model's weights live on (None: not on a mesh)."""
    leaf = jax.tree.leaves(nnx.state(model))[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


def sampling_weights(cfg: Qwen3Config, weights: dict, dtype: Any) -> dict:
    """The engine's sampling layout of ``Qwen3.weights()``: every float array cast to ``dtype`` and the
    stacked layers split into a list of per-layer dicts (the decode loop then never slices or casts
    a weight). Traced inside a jit, so every leaf is a fresh buffer."""
    cast = lambda a: jnp.array(a, dtype=dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,  # noqa: E731
                               copy=True)
    out = {k: cast(v) for k, v in weights.items() if k != "layers"}
    stacked = weights["layers"]
    out["layers"] = [{n: cast(a[i]) for n, a in stacked.items()} for i in range(cfg.num_hidden_layers)]
    return out


def weight_axes(model: Qwen3) -> dict:
    """The logical axes of every array of ``model.weights()``, in the same nested dict (stacked layer
    weights keep their leading ``layers`` axis); None for an array without axes."""
    return nnx.to_pure_dict(nnx.state(model), lambda v: v.get_metadata().get("logical_axes"))


def sampling_sharding(array: Any, axes: Optional[Sequence[Optional[str]]], layer_slice: bool = False) -> Any:
    """Sharding of the sampling copy of a trainer ``array`` whose dims are named ``axes``: the same mesh,
    the spec :data:`sod_jax.parallel.SAMPLING_RULES` give those axes (fsdp not used: decode then needs
    no all-gather of fsdp shards). ``layer_slice``: for one layer's ``[...]`` slice of a stacked
    ``[L, ...]`` array. An array not on a mesh keeps its sharding."""
    sharding = array.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    shape = array.shape[1:] if layer_slice else array.shape
    if axes is None:
        spec = jax.sharding.PartitionSpec()
    else:
        spec = parallel.logical_to_spec(tuple(axes)[1:] if layer_slice else axes, shape, sharding.mesh,
                                        parallel.SAMPLING_RULES)
    return jax.sharding.NamedSharding(sharding.mesh, spec)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One prompt to complete ``n`` times (the ``n`` samples share one prefill)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    n: int = 1
    stop_strings: Sequence[str] = ()
    id: Any = None


@dataclass
class Completion:
    """One finished sample. ``finish_reason``: stop (a stop id), stop_string, length (token budget)
    or context (the slot's cache is full)."""

    request_id: Any
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: Optional[str] = None


@dataclass
class Prefix:
    """G prefilled prompts (device arrays; G padded to the row ladder): their cache rows, next-token
    logits and the true lengths of the real ones."""

    k: tuple  # per layer [G, K, H, C]
    v: tuple  # per layer [G, K, C, H]
    logits: jax.Array  # [G, V]
    lengths: list[int]

    @property
    def width(self) -> int:
        return self.v[0].shape[2]


@dataclass(frozen=True)
class Phase:
    """One way a run uses the engine, for the program enumeration: ``n`` samples per prompt with
    sampling ``mode`` (:data:`~sod_jax.rollout.sampling.MODES`), prompts up to ``max_prompt``
    tokens, tool turns of up to ``max_extend`` tokens appended (0: no tools). A longer tool turn
    still runs, compiling its width when it first appears (logged)."""

    n: int
    mode: str
    max_prompt: int
    max_extend: int = 0
    label: str = ""


def engine_options(rollout_cfg: Any) -> dict:
    """The :class:`Engine` keyword arguments set by the ``rollout`` config section beyond the sizes
    each caller picks (extension buckets, ragged and compact decode)."""
    tail = int(rollout_cfg.tail_slots)
    return {"extend_buckets": tuple(rollout_cfg.extend_buckets), "tail_slots": None if tail < 0 else tail,
            "compact_decode": bool(rollout_cfg.compact_decode)}


class Engine:
    """The slot sampler. See the module docstring for the protocol.

    Weights: the engine owns a *sampling copy* of the model's weights in the compute dtype
    (``cfg.dtype``), made by :meth:`update_params` in one jitted cast + reshard. It never aliases the
    trainer's arrays, so a later donation of those buffers (the jitted update) cannot touch it. It
    costs ``num_params x itemsize(cfg.dtype)`` bytes (divided by the tensor-parallel degree when
    sharded; the sampling layout, :data:`sod_jax.parallel.SAMPLING_RULES`, uses no fsdp): 3.4 GB for
    Qwen3-1.7B in bf16.

    Device calls go through :class:`~sod_jax.programs.Program` objects (``self.programs``), so a
    warm-up over :meth:`program_calls` compiles them before the first request.
    """

    def __init__(
        self,
        model: Qwen3,
        *,
        num_slots: int = 8,
        max_len: int = 2048,
        decode_steps: int = 32,
        prefill_buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
        extend_buckets: Sequence[int] = (32, 128, 512),
        stop_ids: Sequence[int] = (),
        tokenizer: Any = None,
        kv_budget_bytes: Optional[int] = None,
        cache_dtype: Any = None,
        tail_slots: Optional[int] = None,
        compact_decode: bool = True,
    ):
        cfg = model.config
        mesh = _mesh_of(model)
        try:  # the engine samples on this host's devices only (a no-op in a single-process run)
            self.local_mesh = parallel.local_mesh(mesh) if mesh is not None else None
        except parallel.LocalMeshError as e:
            raise EngineError(str(e)) from None
        self.slot_devices = slot_devices(num_slots, dict(self.local_mesh.shape) if mesh is not None else {})
        self._configure(cfg, num_slots=num_slots, max_len=max_len, decode_steps=decode_steps,
                        prefill_buckets=prefill_buckets, extend_buckets=extend_buckets, stop_ids=stop_ids,
                        cache_dtype=cache_dtype, tail_slots=tail_slots, compact_decode=compact_decode)
        self.tokenizer = tokenizer
        log.info("KV cache: %d slots (%d per device) x %d tokens x %d layers x %d kv heads x %d x 2 x %s = %.3f GiB "
                 "per device", num_slots, num_slots // self.slot_devices, max_len, cfg.num_hidden_layers,
                 cfg.num_key_value_heads, cfg.head_dim, jnp.dtype(self.cache_dtype).name, self.kv_bytes / 2**30)
        budget = kv_budget_bytes if kv_budget_bytes else default_kv_budget_bytes(self.weight_bytes)
        problem = kv_budget_problem(cfg, num_slots, max_len, self.cache_dtype, budget,
                                    "the budget" if kv_budget_bytes else DEFAULT_BUDGET_SOURCE,
                                    devices=self.slot_devices)
        if problem:
            raise EngineError(problem)
        self.graphdef = nnx.graphdef(model)
        self.weight_axes = weight_axes(model)  # logical axes of model.weights(): the sampling layout's source
        self.params: dict = {}
        self.update_params(model)

    @classmethod
    def abstract(cls, cfg: Qwen3Config, params: Any, source: Any = None, **options: Any) -> "Engine":
        """An engine over abstract weights, for :meth:`program_calls` and lowering (the planner):
        ``params`` are ``jax.ShapeDtypeStruct`` s of the sampling copy (the output of
        :func:`sampling_weights`, with the shardings it will have), ``source`` those of the trainer's
        ``Qwen3.weights()`` (for the copy program; None: leave it out). ``options``: the keyword
        arguments of :class:`Engine` (no budget check, nothing allocated)."""
        self = cls.__new__(cls)
        self.local_mesh = None
        options.pop("kv_budget_bytes", None)
        leaf = jax.tree.leaves(params)[0]
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        self.slot_devices = slot_devices(options.get("num_slots", 8), dict(mesh.shape) if mesh is not None else {})
        self.tokenizer = options.pop("tokenizer", None)
        self._configure(cfg, **options)
        self.params = params
        self._source_shapes = source
        self._set_state_sharding()
        return self

    def _configure(self, cfg: Qwen3Config, *, num_slots: int = 8, max_len: int = 2048, decode_steps: int = 32,
                   prefill_buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
                   extend_buckets: Sequence[int] = (32, 128, 512), stop_ids: Sequence[int] = (),
                   cache_dtype: Any = None, tail_slots: Optional[int] = None, compact_decode: bool = True) -> None:
        """Sizes, ladders, host bookkeeping and the device programs (no weights, nothing allocated)."""
        self.cfg = cfg
        self.num_slots, self.max_len, self.decode_steps = num_slots, max_len, decode_steps
        # Ragged decode: the longest `tail_slots` slots read the window that holds them, the others only
        # the one that holds the rest (default: 1/8 of the slots, at least 1; 0 = off).
        self.tail_slots = max(1, num_slots // 8) if tail_slots is None else int(tail_slots)
        self.ragged_calls = 0  # decode calls that ran with a ragged read (diagnostics, tests)
        # Compact decode: when at most a quarter of the slots can be active (the tail of a rollout
        # batch), a call decodes only those (gathered, padded to S/4, S/16, ...), not all S rows.
        self.compact_decode = bool(compact_decode)
        self.compact_calls = 0
        self.buckets = sorted(set(int(b) for b in prefill_buckets))
        self.extend_buckets = sorted(set(int(b) for b in extend_buckets))
        self.windows = window_ladder(max_len)
        self.rows = row_ladder(num_slots)
        self.stop_ids = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
        self.stop_set = frozenset(int(i) for i in stop_ids)
        self.dtype = as_dtype(cfg.dtype)
        self.cache_dtype = as_dtype(cache_dtype or cfg.dtype)
        self.kv_bytes = kv_cache_bytes(cfg, num_slots, max_len, self.cache_dtype, self.slot_devices)
        self.weight_bytes = cfg.num_params() * jnp.dtype(self.dtype).itemsize
        self.state: Optional[SlotState] = None  # allocated by the first insert, freed when all slots are free
        self._copy = Program("sampling_copy", jax.jit(partial(sampling_weights, cfg, dtype=self.dtype)))
        self._build()
        self._modes = ["greedy"] * self.num_slots  # per slot: the static sampling mode it needs
        # Host-side bookkeeping without syncs, per slot: an upper bound on its cache length (picks the
        # read window) and on the tokens it may still generate (0 => certainly inactive on device).
        self._bound = np.zeros(self.num_slots, np.int64)
        self._left = np.zeros(self.num_slots, np.int64)
        self._window = 0  # index of the window the last decode call read (diagnostics, tests)

    # -- set-up -------------------------------------------------------------------------------

    def state_shapes(self) -> SlotState:
        """The slot state's ``jax.ShapeDtypeStruct`` s (no allocation)."""
        return jax.eval_shape(self._init_state.fn)

    def _state_sharding(self) -> Any:
        """Where the slot state lives (a :class:`SlotState` of shardings; None: one device): on the
        sampling copy's mesh, the slots split over its ``data`` x ``fsdp`` devices (each device decodes
        its own slots against its own part of the cache; see :func:`slot_devices`) and the kv heads
        over ``tensor`` like the sampling copy's k/v projections."""
        leaf = jax.tree.leaves(self.params)[0] if self.params else None
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        mesh = sharding.mesh
        shape = dict(mesh.shape)
        slots = tuple(a for a in ("data", "fsdp") if shape.get(a, 1) > 1) if self.slot_devices > 1 else ()
        slot_axis = (slots if len(slots) > 1 else slots[0]) if slots else None
        t = shape.get("tensor", 1)
        heads = "tensor" if t > 1 and self.cfg.num_key_value_heads % t == 0 else None
        P, N = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
        vec, cache = N(mesh, P(slot_axis)), N(mesh, P(slot_axis, heads, None, None))
        L = self.cfg.num_hidden_layers
        return SlotState((cache,) * L, (cache,) * L, vec, vec, vec, vec, vec, N(mesh, P(slot_axis, None)), vec, vec,
                         vec, vec)

    def slot_groups(self) -> Optional[tuple]:
        """``(mesh, slot axes, slots per group)`` when the slots are split over device groups (the
        extension then runs per group), else None."""
        if self._sharding is None or self.slot_devices <= 1:
            return None
        spec = self._sharding.lengths.spec
        axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
        if not axes or axes == (None,):
            return None
        return self._sharding.lengths.mesh, tuple(axes), self.num_slots // self.slot_devices

    def group_count(self) -> int:
        """Device groups the programs split the slots over (1: they run on the whole batch)."""
        return self.slot_devices if self.slot_groups() is not None else 1

    def extend_rows_ladder(self) -> tuple[int, ...]:
        """The batch sizes of an extension call: the row ladder, per device group when the slots are
        split (``D x`` the ladder of one group's slots, so every group gets the same share)."""
        D = self.group_count()
        return tuple(D * g for g in row_ladder(self.num_slots // D))

    def _on_groups(self, fn, w, st, split_args: tuple, rep_args: tuple, outputs: int, wide: int = 0):
        """``fn(w, st, first, axes, *split_args, *rep_args)`` run by each device group on its own
        slots: a ``shard_map`` over the slot ``axes``, so no cache row crosses devices and the
        temporaries are per group (``first``: the group's first global slot; ``axes`` for the
        group's collectives). ``st`` and ``split_args`` (None entries
        pass through) are split along their first axis, group-major; ``rep_args`` are replicated.
        ``fn`` returns ``(state, outputs)`` with ``outputs`` arrays: the first ``wide`` are
        ``[steps, rows]`` (split along the rows), the others ``[rows, ...]``."""
        mesh, axes, per = self.slot_groups()
        P = jax.sharding.PartitionSpec
        ax = axes if len(axes) > 1 else axes[0]
        given = [a for a in split_args if a is not None]

        def local(w, st, *args):
            it = iter(args)
            full = [None if a is None else next(it) for a in split_args]
            return fn(w, st, jax.lax.axis_index(axes) * per, axes, *full, *it)

        out_specs = (P(ax), tuple(P(None, ax) if i < wide else P(ax) for i in range(outputs)))
        in_specs = (P(), P(ax)) + (P(ax),) * len(given) + (P(),) * len(rep_args)
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(axes),
                             check_vma=False)(w, st, *given, *rep_args)

    def slot_device(self, slot: int) -> int:
        """The device group (0 .. slot_devices - 1) that holds ``slot``'s cache row."""
        return slot // (self.num_slots // self.slot_devices)

    def _live_state(self) -> SlotState:
        if self.state is None:
            self.state = self._init_state()
        return self.state

    def free_cache(self) -> None:
        """Drop the KV cache buffers (every slot must be free); the next insert allocates them again."""
        if self._bound.any():
            raise EngineError("free_cache with slots in use; release them first")
        self.state = None

    def update_params(self, model_or_params: Any) -> None:
        """Refresh the engine's sampling copy from a :class:`Qwen3`, its ``nnx.State`` (the trainer's
        ``TrainState.params``) or a ``Qwen3.weights()`` dict: ONE jitted cast to the compute dtype +
        reshard to the sampling layout (:data:`sod_jax.parallel.SAMPLING_RULES`) into new buffers. The caller
        may donate or delete its arrays afterwards. Decode never casts a weight (the copy is already in the
        compute dtype)."""
        w = self.source_weights(model_or_params)
        self._source_shapes = abstract(w)  # the copy program's input, for program_calls
        out_shape = jax.eval_shape(self._copy.fn, w)
        if not self.params or jax.tree.structure(out_shape) != jax.tree.structure(self.params) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(out_shape), jax.tree.leaves(self.params))):
            self._copy = Program("sampling_copy", jax.jit(partial(sampling_weights, self.cfg, dtype=self.dtype),
                                                          out_shardings=self._copy_shardings(w)))
        self.params = {}  # drop the old copy first: the peak is one sampling copy, not two
        params = self._copy(w)
        local = getattr(self, "local_mesh", None)
        if local is not None and jax.process_count() > 1:
            # The copy is laid out on the global mesh replicated over the axes that cross hosts: each
            # host takes its own devices' buffers as arrays on its host-local mesh (no copy).
            params = jax.tree.map(lambda a: parallel.to_local(a, local), params)
        self.params = params
        self._set_state_sharding()

    def source_weights(self, model_or_params: Any) -> dict:
        """``Qwen3.weights()`` of a model, its ``nnx.State`` or a weights dict (returned as is)."""
        src = model_or_params
        if isinstance(src, Qwen3):
            return src.weights()
        if isinstance(src, dict) and "embed" in src and "layers" in src and not isinstance(src["layers"], nnx.State):
            return src
        return nnx.merge(self.graphdef, src).weights()

    def _copy_shardings(self, w: dict) -> dict:
        axes = self.weight_axes
        shard = {k: (sampling_sharding(v, axes.get(k)) if k != "layers" else None) for k, v in w.items()}
        shard["layers"] = [{n: sampling_sharding(a, axes["layers"].get(n), layer_slice=True)
                            for n, a in w["layers"].items()} for _ in range(self.cfg.num_hidden_layers)]
        return shard

    def _set_state_sharding(self) -> None:
        sharding = self._state_sharding()
        if sharding != self._sharding:
            self._sharding = sharding
            self._init_state = Program("init_state", jax.jit(self._empty_state_fn(), out_shardings=sharding))
            if self.state is not None and sharding is not None:
                self.state = jax.device_put(self.state, sharding)

    def _empty_state_fn(self):
        c, S, M = self.cfg, self.num_slots, self.max_len
        L, K, H, dt = c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.cache_dtype

        def empty():
            zi = jnp.zeros((S,), jnp.int32)
            return SlotState(tuple(jnp.zeros((S, K, H, M), dt) for _ in range(L)),
                             tuple(jnp.zeros((S, K, M, H), dt) for _ in range(L)), zi, zi, zi, zi,
                             jnp.zeros((S,), bool), jnp.zeros((S, 2), jnp.uint32), jnp.ones((S,), jnp.float32),
                             zi - 1, jnp.ones((S,), jnp.float32), jnp.zeros((S,), bool))

        return empty

    def _pin(self, st: SlotState) -> SlotState:
        """Keep a program's output state where its input state lives (a stable signature)."""
        return st if self._sharding is None else jax.lax.with_sharding_constraint(st, self._sharding)

    def _build(self) -> None:
        cfg, M, windows = self.cfg, self.max_len, self.windows
        cache_dtype, stop_ids = self.cache_dtype, self.stop_ids
        K, H = cfg.num_key_value_heads, cfg.head_dim
        self._sharding = None
        self._init_state = Program("init_state", jax.jit(self._empty_state_fn()))

        @jax.jit
        def prefill(w, tokens, n_valid):
            G, C = tokens.shape
            cache = KVCache(tuple(jnp.zeros((G, K, H, C), cache_dtype) for _ in range(cfg.num_hidden_layers)),
                            tuple(jnp.zeros((G, K, C, H), cache_dtype) for _ in range(cfg.num_hidden_layers)))
            positions = jnp.broadcast_to(jnp.arange(C)[None], (G, C))
            write = CacheWrite(None, jnp.zeros((G,), jnp.int32), positions < n_valid[:, None],
                               fresh_block=cfg.attention_block)  # an empty cache: blocked self-attention
            h, cache = forward(cfg, w, tokens, positions, cache=cache, write=write)
            return cache.k, cache.v, _last_logits(cfg, w, h, n_valid)

        @partial(jax.jit, donate_argnums=(1,), static_argnames=("mode",))
        def insert(w, st, k_rows, v_rows, logits, lengths, src, slots, seeds, sample_idx, temp, top_k, top_p,
                   greedy, budget, mode):
            """Slot ``slots[j]`` gets prompt ``src[j]``; out-of-range slots (padding) are dropped."""
            C = v_rows[0].shape[2]
            k = tuple(a.at[slots, :, :, :C].set(r[src], mode="drop") for a, r in zip(st.k, k_rows))
            v = tuple(a.at[slots, :, :C].set(r[src], mode="drop") for a, r in zip(st.v, v_rows))
            n = slots.shape[0]
            keys = jax.vmap(request_key)(seeds, sample_idx)  # on device: no per-request host dispatch
            tok, lp = sample(logits[src], token_keys(keys, jnp.zeros((n,), jnp.int32)), temp, top_k, top_p, greedy,
                             mode)
            length = lengths[src]
            remaining = budget - 1
            active = ~jnp.isin(tok, stop_ids) & (remaining > 0) & (length < M)
            put = lambda a, x: a.at[slots].set(x, mode="drop")  # noqa: E731
            st = st._replace(
                k=k, v=v, lengths=put(st.lengths, length), next_token=put(st.next_token, tok),
                counters=put(st.counters, jnp.ones_like(tok)), remaining=put(st.remaining, remaining),
                active=put(st.active, active), base_keys=put(st.base_keys, keys), temperature=put(st.temperature, temp),
                top_k=put(st.top_k, top_k), top_p=put(st.top_p, top_p), greedy=put(st.greedy, greedy))
            return self._pin(st), (tok, lp, active)

        def decode_loop(w, st, tail_rows, window, tail_window, steps, mode, group_axes=None):
            """``steps`` decode steps of every row of ``st``, each reading ``windows[window]`` positions
            (the rows ``tail_rows [R]``: ``windows[tail_window]``, when >= 0; see :class:`CacheRead`).
            Run per device group (``group_axes``: the shard_map's slot axes), every group goes on
            while any group has an active slot: the groups stay in step, so collectives inside the
            step (tensor-parallel weights) always meet their peers."""
            S = st.lengths.shape[0]
            out = (jnp.zeros((steps, S), jnp.int32), jnp.zeros((steps, S), jnp.float32), jnp.zeros((steps, S), bool))
            read = CacheRead(windows, window, tail_rows, tail_window if tail_rows is not None else None)

            def body(carry):
                i, st, (toks, lps, emitted) = carry
                st, (tok, lp, act) = _decode_one(cfg, w, st, stop_ids, mode, M, read)
                return i + 1, st, (toks.at[i].set(tok), lps.at[i].set(lp), emitted.at[i].set(act))

            def go_on(c):
                live = jnp.any(c[1].active)
                if group_axes is not None:
                    live = jax.lax.psum(live.astype(jnp.int32), group_axes) > 0
                return (c[0] < steps) & live

            # Stops as soon as no slot is active: a call whose slots all finish early costs no more.
            _, st, out = jax.lax.while_loop(go_on, body, (0, st, out))
            return st, out + (st.active,)  # a copy of the flags: the state itself is donated next call

        @partial(jax.jit, donate_argnums=(1,), static_argnames=("steps", "mode"))
        def step(w, st, tail_rows, window, tail_window, steps, mode):
            """``decode_loop`` over every slot. With the slots split over device groups each group
            decodes its own slots (``tail_rows``: per group, group-major, local to the group)."""
            if self.slot_groups() is None:
                st, out = decode_loop(w, st, tail_rows, window, tail_window, steps, mode)
            else:
                st, out = self._on_groups(lambda w, st, first, axes, tail, window, tail_window: decode_loop(
                    w, st, tail, window, tail_window, steps, mode, axes), w, st, (tail_rows,),
                    (window, tail_window), outputs=4, wide=3)
            return self._pin(st), out

        def decode_rows(w, st, rows, tail_rows, window, tail_window, steps, mode, group_axes=None):
            """Decode only the slots ``rows [P]`` (distinct; every other slot is inactive): their state
            and cache rows are gathered, decoded as a batch of P and written back, so the matmuls
            run on P rows, not S. ``tail_rows`` index into ``rows``. Outputs are ``[steps, S]``."""
            S = st.lengths.shape[0]
            sub, (toks, lps, emitted, _) = decode_loop(w, jax.tree.map(lambda a: a[rows], st), tail_rows, window,
                                                        tail_window, steps, mode, group_axes)
            st = jax.tree.map(lambda a, b: a.at[rows].set(b), st, sub)
            wide = lambda x: jnp.zeros((x.shape[0], S), x.dtype).at[:, rows].set(x)  # noqa: E731
            return st, (wide(toks), wide(lps), wide(emitted), st.active)

        @partial(jax.jit, donate_argnums=(1,), static_argnames=("steps", "mode"))
        def step_rows(w, st, rows, tail_rows, window, tail_window, steps, mode):
            """:func:`decode_rows`; with the slots split over device groups, ``rows`` hold the same
            number of slots of each group, group-major, and each group gathers and decodes its own
            (``tail_rows`` then index into the group's share of ``rows``)."""
            if self.slot_groups() is None:
                st, out = decode_rows(w, st, rows, tail_rows, window, tail_window, steps, mode)
            else:
                st, out = self._on_groups(lambda w, st, first, axes, rows, tail, window, tail_window: decode_rows(
                    w, st, rows - first, tail, window, tail_window, steps, mode, axes), w, st,
                    (rows, tail_rows), (window, tail_window), outputs=4, wide=3)
            return self._pin(st), out

        def extend_rows(w, st, rows, tokens, n_valid, budget, window, mode, with_logits):
            """Rows ``rows [G]`` of ``st`` (out of range: padding) append ``tokens [G, C]`` (column 0 is
            filled with each slot's pending token here), ``n_valid [G]`` real, and sample their next
            token; attention reads ``windows[window]`` positions. Padding tokens past the slot's end
            are not written (the write drops out-of-range positions)."""
            S = st.lengths.shape[0]
            safe = jnp.minimum(rows, S - 1)
            tokens = tokens.at[:, 0].set(st.next_token[safe])
            start = st.lengths[safe]
            G, C = tokens.shape
            # The tokens go through in chunks of EXTEND_CHUNK (a scan; each chunk is written to the cache
            # before the next one attends), so the attention's temporaries are [G, chunk, window], not
            # [G, C, window]: a 1,024-token tool turn against a long cache stays small.
            chunk = _extend_chunk(C)
            n_chunks = C // chunk

            def body(carry, xs):
                k, v, last = carry
                c, toks = xs  # chunk index, [G, chunk]
                at = start + c * chunk
                col = c * chunk + jnp.arange(chunk)[None]  # [1, chunk] column within the extension
                write = CacheWrite(safe, at, (col < n_valid[:, None]) & (rows < S)[:, None], CacheRead(windows, window))
                h, cache = forward(cfg, w, toks, at[:, None] + jnp.arange(chunk)[None], cache=KVCache(k, v),
                                   write=write)
                i = n_valid - 1 - c * chunk  # the row's last real token, when it is in this chunk
                here = jnp.take_along_axis(h, jnp.clip(i, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
                last = jnp.where(((i >= 0) & (i < chunk))[:, None], here, last)
                return (cache.k, cache.v, last), None

            xs = (jnp.arange(n_chunks), tokens.reshape(G, n_chunks, chunk).transpose(1, 0, 2))
            last0 = jnp.zeros((G, cfg.hidden_size), as_dtype(cfg.dtype))
            (ck, cv, last), _ = jax.lax.scan(body, (tuple(st.k), tuple(st.v), last0), xs)
            cache = KVCache(ck, cv)
            logits = lm_logits(cfg, w, last)
            tok, lp = sample(logits, token_keys(st.base_keys[safe], st.counters[safe]), st.temperature[safe],
                             st.top_k[safe], st.top_p[safe], st.greedy[safe], mode)
            length = start + n_valid
            active = ~jnp.isin(tok, stop_ids) & (budget > 1) & (length < M)
            put = lambda a, x: a.at[rows].set(x, mode="drop")  # noqa: E731
            st = st._replace(k=cache.k, v=cache.v, lengths=put(st.lengths, length), next_token=put(st.next_token, tok),
                             counters=put(st.counters, st.counters[safe] + 1), remaining=put(st.remaining, budget - 1),
                             active=put(st.active, active))
            return st, (tok, lp, active) + ((logits,) if with_logits else ())

        @partial(jax.jit, donate_argnums=(1,), static_argnames=("mode", "with_logits"))
        def extend(w, st, rows, tokens, n_valid, budget, window, order, mode, with_logits=False):
            """:func:`extend_rows` of the slots ``rows [G]``; outputs in the caller's order (entry n is
            batch row ``order[n]``'s). With the slots split over device groups (:meth:`slot_groups`)
            the batch is grouped too: rows ``[d * G/D, (d + 1) * G/D)`` are slots of group d, and each
            group extends its own rows against its own part of the cache (a ``shard_map`` over the
            slot axes), so no cache row crosses devices and the temporaries are per group."""
            if self.slot_groups() is None:
                st, out = extend_rows(w, st, rows, tokens, n_valid, budget, window, mode, with_logits)
            else:
                st, out = self._on_groups(lambda w, st, first, _, rows, tokens, n_valid, budget, window: extend_rows(
                    w, st, rows - first, tokens, n_valid, budget, window, mode, with_logits),
                    w, st, (rows, tokens, n_valid, budget), (window,), outputs=4 if with_logits else 3)
            return self._pin(st), out if self.slot_groups() is None else tuple(x[order] for x in out)

        @partial(jax.jit, donate_argnums=(0,))
        def set_slot(st, slot, length, active):
            st = st._replace(lengths=st.lengths.at[slot].set(length), active=st.active.at[slot].set(active))
            return self._pin(st)

        self._prefill, self._insert = Program("prefill", prefill), Program("insert", insert)
        self._step, self._step_rows = Program("decode", step), Program("decode_rows", step_rows)
        self._extend, self._set_slot = Program("extend", extend), Program("set_slot", set_slot)

    @property
    def programs(self) -> list[Program]:
        return [self._copy, self._init_state, self._prefill, self._insert, self._step, self._step_rows, self._extend,
                self._set_slot]

    # -- low-level protocol ----------------------------------------------------------------------

    def bucket(self, n: int, room: int, buckets: Optional[Sequence[int]] = None) -> int:
        """Padded length for ``n`` tokens (:func:`length_bucket` over the prefill buckets by default),
        never more than ``room``."""
        return length_bucket(n, self.buckets if buckets is None else buckets, room)

    def check_prompt(self, n_tokens: int) -> Optional[EngineError]:
        """Why a prompt of ``n_tokens`` cannot be served (None when it can)."""
        if n_tokens == 0:
            return EngineError("empty prompt")
        if n_tokens >= self.max_len:
            return EngineError(f"prompt has {n_tokens} tokens but a slot holds {self.max_len} (rollout max length); "
                               "shorten the prompt or raise the slot length")
        return None

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefix:
        """Prefill several prompts in one device call (padded to a common length bucket; the
        number of prompts is padded to the row ladder)."""
        if prompts and isinstance(prompts[0], (int, np.integer)):
            prompts = [prompts]  # a single prompt
        lens = [len(p) for p in prompts]
        for n in lens:
            err = self.check_prompt(n)
            if err:
                raise err
        C = self.bucket(max(lens), self.max_len)
        G = pad_to(len(prompts), self.rows)
        if len(prompts) > G:
            raise EngineError(f"{len(prompts)} prompts in one prefill exceed the {self.num_slots} decode slots")
        tokens = np.zeros((G, C), np.int32)
        n_valid = np.ones(G, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            n_valid[i] = len(p)
        k, v, logits = self._prefill(self.params, tokens, n_valid)
        return Prefix(k, v, logits, lens)

    def insert(self, prefix: Prefix, slots: Sequence[int], sampling: Sequence[SamplingParams],
               seeds: Sequence[int], sample_indices: Sequence[int], budgets: Sequence[int],
               src: Optional[Sequence[int]] = None):
        """Copy prompt ``src[j]`` of ``prefix`` (default 0) into ``slots[j]`` and sample each slot's first
        token; slot j samples with the key of sample ``sample_indices[j]`` of seed ``seeds[j]``. Returns
        device arrays (token, logprob, still active) per slot, padded to the row ladder (entry j is
        ``slots[j]``'s); no host sync."""
        n = len(slots)
        if n > self.num_slots:
            raise EngineError(f"n={n} samples exceed the {self.num_slots} decode slots; raise rollout.num_slots")
        src = [0] * n if src is None else list(src)
        for s, p, j, b in zip(slots, sampling, src, budgets):
            self._modes[s] = mode_of(p)
            self._bound[s] = prefix.lengths[j] + 1
            self._left[s] = b - 1
        N = pad_to(n, self.rows)
        pad = N - n

        def arr(xs, dt, fill):  # host arrays: the executable places them itself
            return np.asarray(list(xs) + [fill] * pad, dt)

        G = prefix.logits.shape[0]
        state = self._live_state()
        self.state = None  # donated
        self.state, out = self._insert(
            self.params, state, prefix.k, prefix.v, prefix.logits,
            np.asarray(prefix.lengths + [1] * (G - len(prefix.lengths)), np.int32), arr(src, np.int32, 0),
            arr(slots, np.int32, self.num_slots), arr(seeds, np.uint32, 0), arr(sample_indices, np.int32, 0),
            arr([p.temperature for p in sampling], np.float32, 1.0), arr([p.top_k for p in sampling], np.int32, -1),
            arr([p.top_p for p in sampling], np.float32, 1.0), arr([p.greedy for p in sampling], bool, True),
            arr(budgets, np.int32, 1), mode=widest_mode(mode_of(p) for p in sampling))
        return out

    def window_index(self, n: int) -> int:
        """Index of the shortest read window that holds ``n`` positions."""
        return next((i for i, w in enumerate(self.windows) if w >= n), len(self.windows) - 1)

    @property
    def capacity(self) -> int:
        """Positions the last decode or extension call read (a window of :func:`window_ladder`)."""
        return self.windows[self._window]

    def step_async(self, steps: Optional[int] = None):
        """Dispatch one decode call (``steps`` tokens for every active slot) and return its device
        outputs without waiting: tokens/logprobs/emitted ``[steps, S]`` and active flags ``[S]``."""
        steps = steps or self.decode_steps
        grow = np.minimum(self._left, steps)  # no slot can grow further in this call
        self._bound = np.minimum(self._bound + grow, self.max_len)
        self._left -= grow
        mode = widest_mode(self._modes)
        rows = self._compact_rows(grow > 0)
        state = self._live_state()
        self.state = None  # donated
        if rows is None:
            tail, window, tail_window = self._read_plan(self._bound)
            self.state, out = self._step(self.params, state, tail, np.int32(window), np.int32(tail_window),
                                         steps=steps, mode=mode)
        else:
            tail, window, tail_window = self._read_plan(self._bound[rows])
            self.state, out = self._step_rows(self.params, state, rows, tail, np.int32(window), np.int32(tail_window),
                                              steps=steps, mode=mode)
            self.compact_calls += 1
        self._window = max(window, tail_window)
        self.ragged_calls += tail_window >= 0
        return out

    def _compact_rows(self, live: np.ndarray) -> Optional[np.ndarray]:
        """The slots a decode call runs when few may be active (``live [S]``: budget left): per device
        group (one group when the slots are not split) its live ones padded with its idle ones to a
        size S_g/4, S_g/16, ... (S_g = slots per group; a few compiled variants), group-major; or
        None when some group has more than S_g/4 live (decode all S rows)."""
        D = self.group_count()
        per = self.num_slots // D
        groups = live.reshape(D, per)
        n = int(groups.sum(axis=1).max())
        if not self.compact_decode or n == 0 or 4 * n > per:
            return None
        P = per // 4
        while P >= 4 and 4 * n <= P:  # stays >= n: it is divided only while 4n <= P
            P //= 4
        rows = [d * per + np.sort(np.concatenate([np.flatnonzero(g), np.flatnonzero(~g)[: P - int(g.sum())]]))
                for d, g in enumerate(groups)]
        return np.concatenate(rows).astype(np.int32)

    def compact_sizes(self) -> list[int]:
        """Every batch size a compact decode call may have (see :meth:`_compact_rows`)."""
        D = self.group_count()
        per = self.num_slots // D
        if not self.compact_decode or per < 4:
            return []
        out, P = [per // 4], per // 4
        while P >= 4:
            P //= 4
            out.append(P)
        return [D * p for p in out if p >= 1]

    def _tail_count(self, rows: int) -> int:
        """Tail rows per device group of a decode call over ``rows`` rows (0: no ragged read in that
        program): ``tail_slots`` shared out over the groups, at least one each."""
        D = self.group_count()
        per_group = -(-self.tail_slots // D) if self.tail_slots > 0 else 0
        return per_group if 0 < per_group < rows // D else 0

    def _read_plan(self, bounds: np.ndarray) -> tuple[Optional[np.ndarray], int, int]:
        """(tail rows or None, common window index, tail window index or -1) of a decode call over
        rows with length bounds ``bounds`` (group-major when the slots are split): in each device
        group the :meth:`_tail_count` rows with the largest bounds read the window that holds them
        (their indices, local to the group, group-major ``[D x R]``), every other row the window
        that holds the longest of the rest over all groups. The tail window is -1 (no tail read)
        when that saves nothing."""
        R = self._tail_count(len(bounds))
        full = self.window_index(max(int(bounds.max()), 1))
        if R == 0:
            return None, full, -1
        groups = bounds.reshape(self.group_count(), -1)
        order = np.argsort(-groups, axis=1, kind="stable")
        common = self.window_index(max(int(np.take_along_axis(groups, order[:, R:R + 1], axis=1).max()), 1))
        tail = np.sort(order[:, :R], axis=1).reshape(-1).astype(np.int32)
        return (tail, full, -1) if common >= full else (tail, common, full)

    def may_generate(self, slots: Optional[Sequence[int]] = None) -> bool:
        """False when none of ``slots`` (default all) can still be active on the device: its token budget
        is spent, so a decode call would do nothing for it (known without a host sync)."""
        left = self._left if slots is None else self._left[list(slots)]
        return bool(left.size) and bool(left.max() > 0)

    def step(self, steps: Optional[int] = None):
        """:meth:`step_async` and wait: host numpy arrays."""
        return tuple(np.asarray(x) for x in jax.device_get(self.step_async(steps)))

    def extend_many(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]], budgets: Sequence[int],
                    lengths: Optional[Sequence[int]] = None, return_logits: bool = False) -> list:
        """Append ``token_ids[j]`` (a tool response) to finished slot ``slots[j]`` after its pending last
        token and sample each slot's next token: one device call per length bucket (tool-text buckets
        ``extend_buckets``; the number of slots padded to the row ladder), no host sync when the
        caller passes the slots' cache ``lengths`` (else one sync for all). ``budgets[j]`` = tokens
        the slot may still generate. Returns one (token, logprob, active[, logits]) tuple of device
        arrays per bucket group with the group's positions in ``slots``: ``[(idx, out), ...]``
        (entry g of a group's arrays is ``slots[idx[g]]``'s). Raises :class:`EngineError` when any
        extension would overflow its slot (check first with :meth:`extend_problem`)."""
        if lengths is None:
            lengths = np.asarray(jax.device_get(self._live_state().lengths))[list(slots)].tolist()
        for s, ids, ln in zip(slots, token_ids, lengths):
            err = self.extend_problem(s, len(ids), ln)
            if err:
                raise err
        groups: dict[int, list[int]] = {}
        for j, ids in enumerate(token_ids):
            groups.setdefault(length_bucket(len(ids) + 1, self.extend_buckets, self.max_len), []).append(j)
        results = []
        D = self.group_count()
        for C, idx in groups.items():
            # Batch row of each item: grouped by the device group that holds its slot, each group padded
            # to the same size (one group's share of the batch); `order` puts the outputs back in idx order.
            by_group: dict[int, list[int]] = {}
            for j in idx:
                by_group.setdefault(self.slot_device(slots[j]) if D > 1 else 0, []).append(j)
            G = pad_to(D * max(len(v) for v in by_group.values()), self.extend_rows_ladder())
            g_rows = G // D
            at = {j: d * g_rows + k for d, js in by_group.items() for k, j in enumerate(js)}
            order = np.zeros(G, np.int32)
            order[:len(idx)] = [at[j] for j in idx]
            rows = np.full(G, self.num_slots, np.int32)  # out of range: padding rows
            tokens = np.zeros((G, C), np.int32)
            n_valid = np.ones(G, np.int32)
            budget = np.ones(G, np.int32)
            for j in idx:
                g = at[j]
                s, ids = slots[j], token_ids[j]
                rows[g], n_valid[g], budget[g] = s, len(ids) + 1, budgets[j]
                tokens[g, 1:len(ids) + 1] = ids
                self._bound[s] = lengths[j] + len(ids) + 2
                self._left[s] = budgets[j] - 1
            window = self._window = self.window_index(max(lengths[j] + len(token_ids[j]) + 1 for j in idx))
            state = self._live_state()
            self.state = None  # donated
            self.state, out = self._extend(self.params, state, rows, tokens, n_valid, budget, np.int32(window), order,
                                           mode=widest_mode(self._modes[slots[j]] for j in idx),
                                           with_logits=return_logits)
            results.append((idx, out))
        return results

    def extend_problem(self, slot: int, n_tokens: int, length: int) -> Optional[EngineError]:
        """Why appending ``n_tokens`` to ``slot`` (holding ``length`` cached tokens) cannot be served."""
        if length + n_tokens + 1 >= self.max_len:
            return EngineError(f"extending slot {slot} by {n_tokens + 1} tokens overflows its {self.max_len}-token "
                               f"cache ({length} used); raise the slot length or lower rollout.max_response_length")
        return None

    def extend(self, slot: int, token_ids: Sequence[int], budget: int, return_logits: bool = False):
        """One-slot :meth:`extend_many` with a host sync: (token, logprob, still active) and, with
        ``return_logits``, the next-token logits ``[V]`` as well."""
        (_, out), = self.extend_many([slot], [token_ids], [budget], return_logits=return_logits)
        out = jax.device_get(out)
        res = (int(out[0][0]), float(out[1][0]), bool(out[2][0]))
        return res + (np.asarray(out[3][0]),) if return_logits else res

    def finish(self, slot: int, length: Optional[int] = None) -> None:
        """Stop a slot (e.g. a stop string was seen); optionally roll its cache back to ``length``."""
        state = self._live_state()
        ln = int(jax.device_get(state.lengths)[slot]) if length is None else length
        self._bound[slot] = ln + 1
        self._left[slot] = 0
        self.state = None  # donated
        self.state = self._set_slot(state, np.int32(slot), np.int32(ln), np.bool_(False))

    def release(self, slot: int) -> None:
        """Forget a finished slot (its sampling mode no longer widens the decode call); when every slot
        is free the KV cache is freed (it is allocated again by the next insert)."""
        self._modes[slot] = "greedy"
        self._bound[slot] = 0
        self._left[slot] = 0
        if not self._bound.any():
            self.state = None

    # -- the program set ---------------------------------------------------------------------------

    def program_calls(self, phases: Sequence[Phase], with_copy: bool = True) -> list[Call]:
        """Every device program the engine can run for ``phases``, with abstract inputs (nothing is
        allocated): the sampling copy, the state's allocation, prefill and insert per prompt-count and
        prompt-length bucket, decode per batch size, extension per slot-count and tool-text bucket,
        and the slot stop. Duplicates are dropped by :func:`sod_jax.programs.unique`."""
        i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
        sds = jax.ShapeDtypeStruct
        w = abstract(self.params)
        shapes = self.state_shapes()
        st = (jax.tree.map(lambda a: sds(a.shape, a.dtype), shapes) if self._sharding is None else
              jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), shapes, self._sharding))
        scalar = sds((), i32)
        cfg, S = self.cfg, self.num_slots
        L, K, H, V = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
        calls = [Call(self._init_state, (), {}, "init_state"),
                 Call(self._set_slot, (st, np.int32(0), np.int32(0), np.bool_(False)), {}, "set_slot")]
        if with_copy and self._source_shapes is not None:
            calls.append(Call(self._copy, (self._source_shapes,), {}, "sampling_copy"))
        for ph in phases:
            prompt_buckets = sorted({self.bucket(n, self.max_len) for n in self._prompt_lengths(ph.max_prompt)})
            per_prefill = max(1, S // max(ph.n, 1))  # prompts whose n samples fit the slots at once
            for g in range(1, per_prefill + 1):
                G, N = pad_to(g, self.rows), pad_to(g * ph.n, self.rows)
                for C in prompt_buckets:
                    rows_k = tuple(sds((G, K, H, C), self.cache_dtype) for _ in range(L))
                    rows_v = tuple(sds((G, K, C, H), self.cache_dtype) for _ in range(L))
                    calls.append(Call(self._prefill, (w, sds((G, C), i32), sds((G,), i32)), {}, f"prefill {G}x{C}"))
                    vec = lambda dt: sds((N,), dt)  # noqa: E731
                    calls.append(Call(self._insert, (w, st, rows_k, rows_v, sds((G, V), f32), sds((G,), i32),
                                                     vec(i32), vec(i32), vec(u32), vec(i32), vec(f32), vec(i32),
                                                     vec(f32), vec(bool), vec(i32)), {"mode": ph.mode},
                                      f"insert {N} slots from {G}x{C}"))
            D = self.group_count()
            R = self._tail_count(S)
            tail = sds((D * R,), i32) if R else None
            calls.append(Call(self._step, (w, st, tail, scalar, scalar), {"steps": self.decode_steps, "mode": ph.mode},
                              f"decode {S} slots"))
            for P in self.compact_sizes():
                Rp = self._tail_count(P)
                calls.append(Call(self._step_rows, (w, st, sds((P,), i32), sds((D * Rp,), i32) if Rp else None, scalar,
                                                    scalar), {"steps": self.decode_steps, "mode": ph.mode},
                                  f"decode {P} slots"))
            if ph.max_extend:
                for C in self._extend_widths(ph.max_extend):
                    for G in self.extend_rows_ladder():
                        calls.append(Call(self._extend, (w, st, sds((G,), i32), sds((G, C), i32), sds((G,), i32),
                                                         sds((G,), i32), scalar, sds((G,), i32)), {"mode": ph.mode,
                                                                                   "with_logits": False},
                                          f"extend {G}x{C}"))
        return calls

    def _prompt_lengths(self, max_prompt: int) -> list[int]:
        """One length per prefill bucket a prompt of at most ``max_prompt`` tokens can land in."""
        limit = max(1, min(max_prompt, self.max_len - 1))
        out = [b for b in self.buckets if b <= limit]
        return out + [limit]

    def _extend_widths(self, max_tokens: int) -> list[int]:
        """Every padded width an extension of at most ``max_tokens`` appended tokens can have."""
        top = self.extend_buckets[-1] if self.extend_buckets else 1
        widths = {min(b, self.max_len) for b in self.extend_buckets}
        while top < min(max_tokens + 1, self.max_len):
            top *= 2
            widths.add(min(top, self.max_len))
        widest = length_bucket(max_tokens + 1, self.extend_buckets, self.max_len)
        return sorted(w for w in widths if w <= widest)
