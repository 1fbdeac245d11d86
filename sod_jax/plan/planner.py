"""Compile a config's programs for a target and say what fits: :func:`plan_config`.

Residency (per chip) follows what the loops keep alive:

* always: the student's master weights and optimizer state, and the teacher's weights;
* the engine's sampling copy of the weights: made after each update and kept until the next one
  replaces it (it is resident during the update too);
* the KV cache and slot state: allocated by the first insert of a rollout and freed when every
  slot is released, so *not* resident during the update;
* a program's own inputs, non-donated outputs, temporaries and code, while it runs.

So the rollouts hold params + optimizer + teacher + sampling copy + KV cache + the largest engine
program's extra bytes, and the update holds params + optimizer + teacher + sampling copy + batch +
its temporaries. A config fits when every program compiles and both totals are within the
chip memory the compiler reports as available.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import jax

from sod_jax.plan import arith
from sod_jax.plan.build import RLPrograms, build_engine, engine_calls, hosts_of, update_call
from sod_jax.plan.hardware import Target, parse_oom, quiet_stderr
from sod_jax.plan.report import Knob, ProgramReport, gib
from sod_jax.programs import Call
from sod_jax.rollout.engine import SlotState

log = logging.getLogger("sod_jax.plan")


def compile_program(call: Call) -> ProgramReport:
    """Lower and compile ``call`` for its devices; an out-of-memory compile is a result (compiled =
    False with the compiler's message), any other failure raises."""
    t0 = time.perf_counter()
    name = call.program.name
    log.info("compiling %s", call.label or name)
    try:
        with quiet_stderr():
            exe = call.lower().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory verdict is a jax runtime error
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        need, _ = parse_oom(msg)
        first = next((ln for ln in msg.splitlines() if "RESOURCE_EXHAUSTED" in ln or "memory" in ln), msg)
        log.info("%s: does not fit (%.0f s)", call.label or name, time.perf_counter() - t0)
        return ProgramReport(call.label or name, name, False, time.perf_counter() - t0, error=first.strip()[:300],
                             needs=need)
    log.info("%s: compiled (%.0f s)", call.label or name, time.perf_counter() - t0)
    m = exe.memory_analysis()
    cost = exe.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return ProgramReport(call.label or name, name, True, time.perf_counter() - t0, int(m.argument_size_in_bytes),
                         int(m.output_size_in_bytes), int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                         int(m.generated_code_size_in_bytes), float(cost.get("flops", 0.0)),
                         float(cost.get("bytes accessed", 0.0)))


# ---------------------------------------------------------------------------------------------
# Residency
# ---------------------------------------------------------------------------------------------


def _resident_args(call: Call, progs: RLPrograms) -> int:
    """Bytes of ``call``'s arguments that are resident anyway (counted once in the totals): the
    sampling copy, the slot state (KV cache), the trainer's weights, optimizer state and teacher."""
    copy_tree = jax.tree.structure(progs.sampling)
    src_tree = jax.tree.structure(progs.student.params)
    counted = 0
    for arg in call.args:
        if isinstance(arg, SlotState):
            counted += arith.chip_bytes(arg)
            continue
        tree = jax.tree.structure(arg)
        if tree == copy_tree or tree == src_tree or isinstance(arg, type(progs.state)):
            counted += arith.chip_bytes(arg)
        elif progs.teacher is not None and arg is progs.teacher.params:
            counted += arith.chip_bytes(arg)
        elif isinstance(arg, dict) and set(arg) == set(progs.sampling) and "layers" in arg:
            counted += arith.chip_bytes(arg)  # the trainer's weights() layout (the copy program's source)
    return counted


def _extra(report: ProgramReport, call: Call, progs: RLPrograms) -> Optional[int]:
    """A program's bytes beyond the resident trees it reads (None: it did not compile)."""
    if not report.compiled:
        return None
    return max(0, report.peak - _resident_args(call, progs))


def slot_state_bytes(progs: RLPrograms) -> int:
    """Per-chip bytes of the engine's slot state (KV cache and per-slot vectors) as the engine's
    programs receive it."""
    for c in progs.engine_calls:
        for arg in c.args:
            if isinstance(arg, SlotState):
                return arith.chip_bytes(arg)
    return arith.chip_bytes(progs.engine.state_shapes()) if progs.engine is not None else 0


def state_split(state: Any) -> int:
    """How many devices a slot state's slots are split over (1: every device holds every slot)."""
    k = state.k[0]
    rows = k.sharding.shard_shape(tuple(k.shape))[0] if getattr(k, "sharding", None) is not None else k.shape[0]
    return max(1, k.shape[0] // max(rows, 1))


def slot_split(progs: RLPrograms) -> int:
    """How many devices the engine's slots are split over (1: every device holds every slot)."""
    for c in progs.engine_calls:
        for arg in c.args:
            if isinstance(arg, SlotState):
                return state_split(arg)
    return 1


def rl_memory(progs: RLPrograms, reports: dict[str, tuple[Call, ProgramReport]]) -> dict[str, Optional[int]]:
    """The per-chip memory items of an RL plan (see the module docstring)."""
    params = arith.chip_bytes(progs.state.params)
    opt = arith.chip_bytes(progs.state.opt_state)
    teacher = arith.chip_bytes(progs.teacher.params) if progs.teacher is not None else 0
    copy = arith.chip_bytes(progs.sampling)
    kv = slot_state_bytes(progs)
    base = params + opt + teacher
    mem: dict[str, Optional[int]] = dict(params=params, optimizer=opt, teacher=teacher, sampling_copy=copy,
                                         kv_cache=kv)
    mem["update_extra"] = mem["resident_update"] = None
    if "update" in reports:  # absent when only the rollouts are planned
        call, rep = reports["update"]
        upd = _extra(rep, call, progs)
        mem["update_extra"] = upd
        mem["resident_update"] = None if upd is None else base + copy + upd
        rep.resident = mem["resident_update"]
    rollout, refresh, worst = [], None, None
    for label, (c, r) in reports.items():
        if label == "update":
            continue
        extra = _extra(r, c, progs)
        if c.program.name == "sampling_copy":
            refresh = None if extra is None else base + extra  # the old copy is dropped first, no KV cache
            r.resident = refresh
            continue
        r.resident = None if extra is None else base + copy + kv + extra
        rollout.append(r.resident)
        if extra is not None and (worst is None or extra > worst):
            worst = extra
    mem["rollout_extra"] = worst
    mem["resident_rollout"] = None if (not rollout or None in rollout) else max(rollout)
    mem["resident_refresh"] = refresh
    known = [v for v in (mem["resident_update"], mem["resident_rollout"], refresh) if v is not None]
    mem["peak"] = max(known) if known else None
    return mem


def phase_fits(resident: Optional[int], usable: Optional[int]) -> bool:
    return resident is not None and (usable is None or resident <= usable)


# ---------------------------------------------------------------------------------------------
# Searches (each probe compiles)
# ---------------------------------------------------------------------------------------------


def _secant(points: list[tuple[int, int]], room: Optional[int]) -> Optional[float]:
    """Where bytes that grow with a knob reach ``room``: through the last two ``(value, bytes)``
    measurements, or in proportion to the only one."""
    if not room or room <= 0 or not points:
        return None
    (x1, y1) = points[-1]
    if len(points) >= 2:
        x0, y0 = points[-2]
        if x1 != x0 and y1 != y0 and (y1 - y0) / (x1 - x0) > 0:
            return x1 + (room - y1) * (x1 - x0) / (y1 - y0)
    return x1 * room / y1 if y1 > 0 else None


def search_micro_batch(cfg: Any, progs: RLPrograms, usable: Optional[int], seconds: float,
                       current_fits: bool, used: Optional[int] = None,
                       current_resident: Optional[int] = None) -> Knob:
    """The largest ``train.micro_batch_size`` whose update fits beside the resident trees, by compiling."""
    mesh = progs.mesh
    rows_per_mini = progs.rows // progs.spec.mini_batches
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    current = progs.spec.micro_batch_size or rows_per_mini
    cands = arith.micro_batch_candidates(rows_per_mini, batch_devices)
    other = arith.chip_bytes(progs.state) + arith.chip_bytes(progs.sampling) + (
        arith.chip_bytes(progs.teacher.params) if progs.teacher is not None else 0)

    points = [(current, used)] if used else []

    def fits(mb: int) -> bool:
        call = update_call(cfg, progs.student, progs.teacher, mesh, mb)[0]
        rep = compile_program(call)
        extra = max(0, rep.peak - arith.chip_bytes(call.args[:2])) if rep.compiled else rep.needs
        if extra:
            points.append((mb, extra))
        if rep.compiled:
            resident[mb] = other + extra
        return rep.compiled and phase_fits(other + extra, usable)

    resident = {} if current_resident is None else {current: current_resident}

    room = None if usable is None else usable - other
    best, tried, done = arith.largest_fitting(cands, fits, seconds, known={current: current_fits},
                                              predict=lambda: _secant(points, room))
    why = ("rows per micro-batch bound the update's activations (and the old-policy and teacher passes); "
           "gradients are accumulated over micro-batches, the result is unchanged")
    return Knob("train.micro_batch_size", best, current, why, tried, done, resident=resident)


def search_slots(cfg: Any, progs: RLPrograms, usable: Optional[int], seconds: float, current_fits: bool,
                 stop_ids: Optional[tuple], all_programs: bool, skip: tuple = (),
                 used: Optional[int] = None,
                 current_resident: Optional[int] = None) -> tuple[Knob, Optional[tuple[RLPrograms, dict]]]:
    """The largest ``rollout.num_slots`` whose rollout programs fit beside the resident trees, by
    compiling; candidates are multiples of the devices the slots are split over, from rollout.n.
    Also returns the programs and reports measured at that value (None when it was not probed)."""
    current = int(cfg.rollout.num_slots)
    step = slot_split(progs)
    n = int(cfg.rollout.n)
    base = arith.chip_bytes(progs.state) + (arith.chip_bytes(progs.teacher.params) if progs.teacher is not None else 0)
    copy = arith.chip_bytes(progs.sampling)
    # Bytes per slot on a chip, measured at the current count: the ceiling for the candidates.
    per_slot = max(1, slot_state_bytes(progs) // max(current, 1)) * step
    room = (usable - base - copy) if usable else 0
    high = max(current, (room // per_slot) * step) if current_fits and usable else current
    # More slots than a host's share of the step's trajectories would never be used.
    need = -(-(progs.rows // hosts_of(progs.mesh)) // step) * step
    high = min(high, max(current, need))
    cands = arith.slot_candidates(n, high, step)
    # Bytes that grow with the slot count (KV cache + the largest program's extra), measured per probe;
    # the next probe is where the line through the last two measurements meets the room.
    points = [(current, used or 2 * slot_state_bytes(progs))]

    def predict() -> Optional[float]:
        return _secant(points, room)

    def fits(slots: int) -> bool:
        engine, _ = build_engine(cfg, progs.student, slots, stop_ids)
        calls = [c for c in engine_calls(cfg, engine, progs.spec.needs_teacher, all_programs, skip)
                 if c.program.name != "sampling_copy"]
        trial = RLPrograms(progs.mesh, progs.spec, progs.student, progs.teacher, progs.state, progs.batch,
                           progs.update, progs.rows, progs.length, progs.sampling, engine, calls)
        kv = slot_state_bytes(trial)
        reports, worst = {}, kv
        for c in calls:
            rep = reports[c.label or c.program.name] = (c, compile_program(c))
            extra = _extra(rep[1], c, trial)
            worst = max(worst, kv + (extra if extra is not None else rep[1].needs or kv))
            if extra is None or not phase_fits(base + copy + kv + extra, usable):
                points.append((slots, worst))
                return False
        points.append((slots, worst))
        measured[slots] = (trial, reports)
        resident[slots] = base + copy + worst
        return True

    measured: dict[int, tuple[RLPrograms, dict]] = {}
    resident = {} if current_resident is None else {current: current_resident}
    best, tried, done = arith.largest_fitting(cands, fits, seconds, known={current: current_fits}, predict=predict)
    why = (f"each slot holds one trajectory's KV cache ({gib(per_slot // step)} per slot per chip here; the slots "
           f"are split over {step} device(s)); fewer slots mean more rollout waves per step")
    knob = Knob("rollout.num_slots", best, current, why, tried, done, resident=resident)
    return knob, measured.get(best)


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------


def rl_step_time(cfg: Any, progs: RLPrograms, reports: dict[str, tuple[Call, ProgramReport]], target: Target,
                 response_tokens: Optional[int]) -> dict:
    """Estimated seconds of one RL step (see :mod:`sod_jax.plan.arith` for every formula)."""
    chip = target.chip
    if not chip.peak_flops:
        return {}
    n_dev = progs.mesh.size
    peak, bw = chip.peak_flops, chip.hbm_bw
    s_cfg = progs.student.arch.config
    t_cfg = None if progs.teacher is None else progs.teacher.arch.config
    if progs.spec.self_teacher:
        t_cfg = s_cfg
    M = progs.spec.mini_batches
    K = progs.spec.micro_batches(progs.rows)
    fl = arith.update_flops(s_cfg, t_cfg, progs.rows, progs.length, epochs=progs.spec.epochs, remat=s_cfg.remat,
                            student_block=s_cfg.attention_block,
                            teacher_block=0 if t_cfg is None else t_cfg.attention_block)
    by = arith.update_hbm_bytes(s_cfg, t_cfg, tokens_per_chip=progs.rows * progs.length / n_dev, micro_batches=K,
                                mini_batches=M, epochs=progs.spec.epochs, remat=s_cfg.remat,
                                student_param_bytes=arith.itemsize(s_cfg.param_dtype),
                                compute_bytes=arith.itemsize(s_cfg.dtype),
                                teacher_bytes=arith.itemsize(t_cfg.dtype) if t_cfg is not None else 2,
                                fsdp=progs.mesh.shape["fsdp"])
    t_update, bound = arith.roofline_seconds(sum(fl.values()) / n_dev, sum(by.values()), peak, bw)

    def per_call(name: str) -> tuple[float, str, Optional[ProgramReport], Optional[Call]]:
        for c, r in reports.values():
            if c.program.name == name and r.compiled:
                t, b = arith.roofline_seconds(r.flops, r.bytes_accessed, peak, bw)
                return t, b, r, c
        if any(c.program.name == name for c, _ in reports.values()):
            missing.append(name)  # compiled and ran out of memory: no time for it
        else:
            left_out.append(name)  # not compiled at all (--skip): counted as no time, and said so
        return 0.0, "", None, None

    left_out: list[str] = []
    missing: list[str] = []
    t_step, b_step, dec, _ = per_call("decode")
    t_ext, _, _, _ = per_call("extend")
    t_pre, _, _, pre_call = per_call("prefill")
    t_ins, _, _, _ = per_call("insert")
    t_copy, _, _, _ = per_call("sampling_copy")
    r = cfg.rollout
    resp = int(response_tokens or r.max_response_length)
    G = int(pre_call.args[1].shape[0]) if pre_call is not None else 1
    hosts = hosts_of(progs.mesh)  # each host samples its share of the prompts on its own engine
    prompts = -(-int(cfg.train.prompts_per_step) // hosts)
    ro = arith.rollout_seconds(prompts=prompts, n=int(r.n), slots=progs.engine.num_slots,
                               response_tokens=resp, decode_steps=int(r.decode_steps),
                               tool_turns=max(0, int(r.max_assistant_turns) - 1), t_decode_step=t_step, t_extend=t_ext,
                               t_prefill=t_pre, t_insert=t_ins, prompts_per_prefill=G)
    floor = max((arith.chip_bytes(progs.sampling) + slot_state_bytes(progs)) / bw,
                (dec.flops / peak) if dec is not None else 0.0)
    ro_floor = arith.rollout_seconds(prompts=prompts, n=int(r.n), slots=progs.engine.num_slots,
                                     response_tokens=resp, decode_steps=int(r.decode_steps), tool_turns=0,
                                     t_decode_step=floor, t_extend=0.0, t_prefill=0.0, t_insert=0.0,
                                     prompts_per_prefill=G)
    parts = [
        dict(name="rollouts: decode", seconds=ro["decode"],
             detail=f"{ro['waves']:.0f} waves x {math.ceil(resp / r.decode_steps)} calls x {r.decode_steps} steps x "
                    f"{t_step * 1e3:.2f} ms/step ({b_step}-bound)"),
        dict(name="rollouts: tool-turn extensions", seconds=ro["extend"],
             detail=f"{ro['waves']:.0f} waves x {max(0, r.max_assistant_turns - 1)} turns x {t_ext * 1e3:.1f} ms"),
        dict(name="rollouts: prefill + insert", seconds=ro["prefill_insert"],
             detail=f"{math.ceil(prompts / G)} x ({t_pre * 1e3:.1f} + {t_ins * 1e3:.1f}) ms"),
        dict(name="update", seconds=t_update,
             detail=f"{sum(fl.values()) / n_dev / 1e12:.1f} TFLOP, {sum(by.values()) / 1e9:.1f} GB per chip "
                    f"({bound}-bound)"),
        dict(name="sampling copy refresh", seconds=t_copy, detail=""),
    ]
    total = sum(p["seconds"] for p in parts)
    floor_total = total - ro["decode"] + ro_floor["decode"]
    not_compiled = [f"no time for {', '.join(missing)}: not compiled at these settings"] if missing else []
    not_compiled += [f"{', '.join(left_out)} left out (not compiled): counted as no time"] if left_out else []
    if missing:
        total = floor_total = None
    return dict(
        estimate=True, total=total, parts=parts,
        decode_step_floor_s=floor, total_with_decode_floor=floor_total,
        formula=[
            "t(program) = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip, with "
            f"peak {peak / 1e12:.0f} TFLOP/s and {bw / 1e9:.0f} GB/s ({chip.name}, {chip.source})",
            "engine programs: FLOPs and bytes accessed from XLA's cost_analysis() of the compiled program; a decode "
            "call's while loop is counted once by it, i.e. one token step for every slot, reading the largest cache "
            "window (XLA counts a conditional at its costliest branch)",
            "rollouts = waves x (ceil(R / decode_steps) x decode_steps x t(decode step) + (turns - 1) x t(extend)) + "
            "ceil(prompts / G) x (t(prefill) + t(insert)); waves = ceil(prompts / floor(slots / n)), prompts per host "
            f"({hosts} host(s), each with its own engine and rollout.num_slots slots)",
            "update FLOPs (XLA's cost analysis counts each scan body once, so by formula) = "
            "rows x T x [L x (2 P_layer + 4 N H ctx) + 2 D V] x (1 old-policy + teacher + epochs x "
            f"{arith.train_passes(s_cfg.remat)} training) / {n_dev} chips; bytes = weights per micro-batch pass + "
            "optimizer + fp32 logits + layer inputs",
        ],
        assumptions=[f"every trajectory has R = {resp} response tokens (assistant + tool; --response-tokens sets the "
                     "mean), all decoded; every extension at the widest compiled width",
                     f"a decode step moves at least the sampling copy and the KV cache once: "
                     f"{floor * 1e3:.2f} ms per step at the HBM bandwidth (XLA's model: {t_step * 1e3:.2f} ms)",
                     "no overlap between rollouts and update; no host, sandbox or reward time"] + not_compiled)


__all__ = ["compile_program", "phase_fits", "rl_memory", "rl_step_time", "search_micro_batch", "search_slots",
           "slot_split", "slot_state_bytes", "state_split"]
