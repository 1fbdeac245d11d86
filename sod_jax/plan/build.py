"""The programs a config compiles, built from abstract inputs on a mesh of any devices (a TPU
slice's compile-only devices, local GPUs or CPUs): nothing is loaded or allocated.

Each builder mirrors the set-up of the loop that runs the program, through the same public
functions: the RL update as :meth:`sod_jax.rl.trainer.Trainer.setup` builds it
(:func:`sod_jax.rl.update.build_update` with :func:`sod_jax.rl.update.train_state_shardings`, the
batch of :func:`sod_jax.rl.programs.batch_shapes`), the engine over its sampling copy
(:meth:`sod_jax.rollout.engine.Engine.abstract`, the layout :func:`sod_jax.rollout.engine.sampling_sharding`
gives) with its program list (:meth:`~sod_jax.rollout.engine.Engine.program_calls` for the phases
of :func:`sod_jax.rl.programs.engine_phases`), and the SFT step as
:class:`sod_jax.sft.trainer.SFTTrainer` builds it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sod_jax import optim, parallel
from sod_jax.algo import modes
from sod_jax.models.hf import config_from_hf, read_config
from sod_jax.models.presets import PRESETS, preset
from sod_jax.models.qwen3 import Qwen3, Qwen3Config, as_dtype
from sod_jax.programs import Call, Program, unique
from sod_jax.rl import programs as rl_programs
from sod_jax.rl.batch import length_buckets
from sod_jax.rl.update import TrainState, UpdateSpec, build_update, train_state_shardings
from sod_jax.rollout.engine import Engine, engine_options, sampling_sharding, sampling_weights, weight_axes
from sod_jax.sft.packing import SFTBatch
from sod_jax.sft.step import SFTState, build_train_step


class PlanError(ValueError):
    """A config the planner cannot build programs for; the message says what to supply."""


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


@dataclass
class Arch:
    """A model's architecture and run options, and where it came from (for the report)."""

    config: Qwen3Config
    source: str


def _preset_in_path(path: str) -> Optional[str]:
    """A preset whose name appears in ``path`` (``checkpoints/qwen3-0.6b-sft`` -> ``qwen3-0.6b``)."""
    text = path.lower().replace("_", "-")
    hits = [name for name in PRESETS if name in text]
    return max(hits, key=len) if hits else None


def resolve_arch(path: Optional[str], preset_name: Optional[str], role: str, flag: str, **runtime: Any) -> Arch:
    """The architecture of ``role`` (``model.path`` / ``teacher.path``): the preset named by
    ``flag`` when given, else ``config.json`` in the directory, else a preset named in the path."""
    if preset_name:
        return Arch(preset(preset_name, **runtime), f"preset {preset_name} ({flag})")
    if path and (Path(path) / "config.json").is_file():
        return Arch(read_config(path, **runtime), f"{Path(path) / 'config.json'}")
    name = _preset_in_path(path or "")
    if name:
        return Arch(preset(name, **runtime), f"preset {name} (named in {role}={path}; no config.json there)")
    raise PlanError(f"{role}={path!r} has no config.json and names no preset ({', '.join(PRESETS)}): "
                    f"pass {flag} NAME or point {role} at an HF checkpoint directory")


def rl_archs(cfg: Any, student_preset: Optional[str] = None,
             teacher_preset: Optional[str] = None) -> tuple[Arch, Optional[Arch]]:
    """Student and teacher architectures with the run options the RL trainer loads them with."""
    m, t = cfg.model, cfg.teacher
    student = resolve_arch(m.path, student_preset, "model.path", "--student-preset", dtype=m.dtype,
                           param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
                           attention_block=m.attention_block)
    teacher = None
    if modes.needs_teacher_model(cfg.algo.name):
        teacher = resolve_arch(t.path, teacher_preset, "teacher.path", "--teacher-preset", dtype=t.dtype,
                               param_dtype=t.param_dtype, scan_layers=m.scan_layers, remat="none",
                               attention_block=t.attention_block)
    return student, teacher


def sft_arch(cfg: Any, student_preset: Optional[str] = None) -> Arch:
    """The SFT model's architecture as :func:`sod_jax.sft.cli.build_model` makes it."""
    m, s = cfg.model, cfg.sft
    runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
                   attention_block=m.attention_block)
    if s.init and not student_preset:
        if Path(s.init).is_file():
            arch = Arch(config_from_hf(json.loads(Path(s.init).read_text()), s.init, **runtime), s.init)
        else:
            arch = Arch(preset(s.init, **runtime), f"preset {s.init} (sft.init)")
        return Arch(arch.config.replace(**s.init_overrides), arch.source)
    return resolve_arch(m.path, student_preset, "model.path", "--student-preset", **runtime)


# ---------------------------------------------------------------------------------------------
# Abstract trees
# ---------------------------------------------------------------------------------------------


def sds(shape: tuple, dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` s of ``tree`` (abstract or concrete) placed on ``shardings``."""
    return jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), tree, shardings)


@dataclass
class AbstractModel:
    """A model's graph, its abstract params (``nnx.State`` of ShapeDtypeStructs with the shardings
    their logical axes name on the mesh) and the abstract module (for its axis metadata)."""

    arch: Arch
    graphdef: Any
    params: Any
    shardings: Any
    module: Any


def abstract_model(arch: Arch, mesh: Any) -> AbstractModel:
    module = nnx.eval_shape(lambda: Qwen3(arch.config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    shardings = parallel.param_shardings(state, mesh)
    return AbstractModel(arch, graphdef, with_shardings(state, shardings), shardings, module)


def abstract_train_state(tx: Any, model: AbstractModel, mesh: Any) -> tuple[TrainState, TrainState]:
    """The :class:`TrainState` :func:`sod_jax.rl.update.make_train_state` makes, abstract, and its shardings."""
    sh = train_state_shardings(tx, model.params, model.shardings, mesh)
    opt = with_shardings(jax.eval_shape(tx.init, model.params), sh.opt_state)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.PRNGKey(0)))
    state = TrainState(sds((), jnp.int32, sh.step), model.params, opt, sds(rng.shape, rng.dtype, sh.rng))
    return state, sh


# ---------------------------------------------------------------------------------------------
# RL: the update and the engine
# ---------------------------------------------------------------------------------------------


@dataclass
class RLPrograms:
    """Everything the RL planner compiles and measures."""

    mesh: Any
    spec: UpdateSpec
    student: AbstractModel
    teacher: Optional[AbstractModel]
    state: TrainState
    batch: Any
    update: Call
    rows: int
    length: int
    sampling: dict = field(default_factory=dict)
    engine: Optional[Engine] = None
    engine_calls: list = field(default_factory=list)


def max_length(cfg: Any) -> int:
    return int(cfg.data.max_prompt_length + cfg.rollout.max_response_length)


def update_call(cfg: Any, student: AbstractModel, teacher: Optional[AbstractModel], mesh: Any,
                micro_batch_size: Optional[int] = None) -> tuple[Call, UpdateSpec, TrainState, Any, int, int]:
    """The update for the largest length bucket (``train.length_buckets``, else powers of two up to
    ``data.max_prompt_length + rollout.max_response_length``) and the step's full batch."""
    spec = UpdateSpec.from_config(cfg)
    if micro_batch_size is not None:
        spec = dataclasses.replace(spec, micro_batch_size=int(micro_batch_size))
    tx, _ = optim.make_optimizer(optim.OptimizerSpec.from_rl(cfg.optim, max(1, int(cfg.train.total_steps or 1))))
    state, shardings = abstract_train_state(tx, student, mesh)
    fn = build_update(spec, tx, student.graphdef, None if teacher is None else teacher.graphdef, mesh=mesh,
                      state_shardings=shardings)
    rows = int(cfg.train.prompts_per_step * cfg.rollout.n)
    L = max(list(cfg.train.length_buckets or length_buckets(max_length(cfg))))
    batch = rl_programs.batch_shapes(rows, L, L if spec.self_teacher else None, mesh)
    t_params = None if teacher is None else teacher.params
    call = Call(Program("update", fn), (state, t_params, batch), {}, f"update {rows}x{L}")
    return call, spec, state, batch, rows, L


def sampling_copy(model: AbstractModel, dtype: Any) -> tuple[dict, dict]:
    """(source, copy): the trainer's ``Qwen3.weights()`` layout and the engine's sampling copy
    (:func:`sampling_weights` in ``dtype``) as ShapeDtypeStructs with the shardings the engine gives them
    (:func:`sampling_sharding`, as the engine's own copy program does)."""
    src = nnx.to_pure_dict(model.params)
    axes = weight_axes(model.module)
    out = jax.eval_shape(partial(sampling_weights, model.arch.config, dtype=as_dtype(dtype)), src)
    copy = {k: sds(v.shape, v.dtype, sampling_sharding(src[k], axes.get(k))) for k, v in out.items() if k != "layers"}
    layer_sharding = {n: sampling_sharding(a, axes["layers"][n], layer_slice=True) for n, a in src["layers"].items()}
    copy["layers"] = [{n: sds(a.shape, a.dtype, layer_sharding[n]) for n, a in layer.items()}
                      for layer in out["layers"]]
    return src, copy


def engine_kwargs(cfg: Any, num_slots: Optional[int] = None, stop_ids: Optional[tuple] = None) -> dict:
    """The keyword arguments the RL trainer builds its :class:`Engine` with."""
    r = cfg.rollout
    return dict(num_slots=int(num_slots or r.num_slots), max_len=max_length(cfg), decode_steps=r.decode_steps,
                prefill_buckets=tuple(r.prefill_buckets), stop_ids=tuple(stop_ids or ()), **engine_options(r))


def _devices(mesh: Any) -> Optional[np.ndarray]:
    """The mesh's device grid; None for an abstract mesh (which has no devices)."""
    return None if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.devices


def host_mesh(mesh: Any) -> Any:
    """The mesh one host's engine samples on: the part of ``mesh`` on the first host's devices
    (:func:`sod_jax.parallel.local_mesh`, as each process of a multi-host run takes its own), the
    whole mesh on one host. An abstract mesh is one host."""
    devices = _devices(mesh)
    if devices is None or len({d.process_index for d in devices.flat}) == 1:
        return mesh
    try:
        return parallel.local_mesh(mesh, min(d.process_index for d in devices.flat))
    except parallel.LocalMeshError as e:
        raise PlanError(str(e)) from None


def hosts_of(mesh: Any) -> int:
    devices = _devices(mesh)
    return 1 if devices is None else len({d.process_index for d in devices.flat})


def build_engine(cfg: Any, student: AbstractModel, num_slots: Optional[int] = None,
                 stop_ids: Optional[tuple] = None) -> tuple[Engine, dict]:
    """One host's engine over the abstract sampling copy, and the copy (on that host's mesh)."""
    arch = student.arch.config
    src, copy = sampling_copy(student, arch.dtype)
    mesh = jax.tree.leaves(copy)[0].sharding.mesh
    local = host_mesh(mesh)
    if local is not mesh:  # the copy made on the global mesh, read on each host's own devices
        copy = jax.tree.map(lambda a: sds(a.shape, a.dtype, NamedSharding(local, a.sharding.spec)), copy)
    ids = stop_ids or tuple(i for i in (arch.eos_token_id,) if i is not None)
    return Engine.abstract(arch, copy, src, **engine_kwargs(cfg, num_slots, ids)), copy


def engine_calls(cfg: Any, engine: Engine, needs_teacher: bool, all_programs: bool = False,
                 skip: tuple = ()) -> list[Call]:
    """The engine's programs for the run's phases: all of them (``all_programs``), or per program the
    largest call (by argument bytes): the sampling copy, prefill, insert, extension, and the decode
    over all slots; programs named in ``skip`` are left out."""
    with_eval = bool(cfg.data.val_files)
    calls = unique(engine.program_calls(rl_programs.engine_phases(cfg, needs_teacher, with_eval)))
    calls = [c for c in calls if c.program.name not in skip]
    if all_programs:
        return calls
    best: dict[str, Call] = {}
    for c in calls:
        name = c.program.name
        if name not in ("sampling_copy", "prefill", "insert", "extend", "decode"):
            continue
        if name not in best or _arg_size(c) > _arg_size(best[name]):
            best[name] = c
    order = ["sampling_copy", "prefill", "insert", "decode", "extend"]
    return [best[n] for n in order if n in best]


def _arg_size(call: Call) -> int:
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(call.args) if hasattr(x, "shape") and hasattr(x, "dtype"))


def rl_programs_for(cfg: Any, student_arch: Arch, teacher_arch: Optional[Arch], mesh: Any, *,
                    micro_batch_size: Optional[int] = None, num_slots: Optional[int] = None,
                    all_programs: bool = False, with_engine: bool = True,
                    stop_ids: Optional[tuple] = None, skip: tuple = ()) -> RLPrograms:
    """The RL run's update and engine programs on ``mesh`` (see the module docstring)."""
    student = abstract_model(student_arch, mesh)
    teacher = None if teacher_arch is None else abstract_model(teacher_arch, mesh)
    call, spec, state, batch, rows, L = update_call(cfg, student, teacher, mesh, micro_batch_size)
    out = RLPrograms(mesh, spec, student, teacher, state, batch, call, rows, L)
    if with_engine:
        out.engine, out.sampling = build_engine(cfg, student, num_slots, stop_ids)
        out.engine_calls = engine_calls(cfg, out.engine, spec.needs_teacher, all_programs, skip)
    return out


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTPrograms:
    mesh: Any
    model: AbstractModel
    state: SFTState
    batch: SFTBatch
    step: Call
    micro_batches: int  # A
    rows_per_micro: int  # R
    pack_length: int  # L


def sft_programs_for(cfg: Any, arch: Arch, mesh: Any, rows_per_micro: Optional[int] = None) -> SFTPrograms:
    """The SFT step as :class:`sod_jax.sft.trainer.SFTTrainer` builds it. The step's micro-batch count
    A depends on how the data packs; the plan takes its bound, one conversation per row:
    A = ceil(sft.batch_size / R)."""
    s = cfg.sft
    model = abstract_model(arch, mesh)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    R = int(rows_per_micro or s.micro_batch_rows or batch_devices)
    L = int(s.pack_length or s.max_length)
    A = math.ceil(s.batch_size / R)
    total = max(1, int(s.max_steps or 1000))
    tx, schedule = optim.make_optimizer(optim.OptimizerSpec.from_sft(s, total))
    counter = NamedSharding(mesh, P())
    sh = SFTState(counter, model.shardings, optim.opt_state_shardings(tx, model.params, model.shardings, mesh))
    state = SFTState(sds((), jnp.int32, counter), model.params,
                     with_shardings(jax.eval_shape(tx.init, model.params), sh.opt_state))
    fn = build_train_step(model.graphdef, tx, schedule, cfg.model.logprob_chunk, mesh, sh)
    spec = parallel.logical_to_spec((None, "batch", None), (A, R, L), mesh)
    arr = sds((A, R, L), jnp.int32, NamedSharding(mesh, spec))
    batch = SFTBatch(arr, arr, arr, arr)
    call = Call(Program("sft_step", fn), (state, batch), {}, f"sft step {A}x{R}x{L}")
    return SFTPrograms(mesh, model, state, batch, call, A, R, L)


__all__ = ["AbstractModel", "Arch", "PlanError", "RLPrograms", "SFTPrograms", "abstract_model", "build_engine",
           "engine_calls", "engine_kwargs", "host_mesh", "hosts_of", "max_length", "resolve_arch", "rl_archs",
           "rl_programs_for", "sampling_copy", "sft_arch", "sft_programs_for", "update_call"]
