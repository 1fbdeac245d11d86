""":func:`plan_config`: a config and a target in, a :class:`~sod_jax.plan.report.PlanReport` out.

TPU slices (and CPU devices, and GPUs present on this host) are planned by compiling the real
programs for their devices (:mod:`sod_jax.plan.planner`); a GPU count without those GPUs here is
an arithmetic estimate (:mod:`sod_jax.plan.estimate`), labelled as such.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Union

from sod_jax import parallel
from sod_jax.plan import arith
from sod_jax.plan.build import PlanError, hosts_of, rl_archs, rl_programs_for, sft_arch, sft_programs_for
from sod_jax.plan.estimate import plan_estimate
from sod_jax.plan.hardware import Target, gpu_matches, local_gpus, parse_target, target_devices, usable_hbm_bytes
from sod_jax.plan.planner import (
    compile_program,
    phase_fits,
    rl_memory,
    rl_step_time,
    search_micro_batch,
    search_slots,
    slot_split,
)
from sod_jax.plan.report import Knob, PlanReport, gib


def target_info(t: Target, usable: Optional[int]) -> dict:
    c = t.chip
    return dict(name=t.name, describe=t.describe(), chips=t.chips, chip=c.name, topology=t.topology,
                hbm_bytes=c.hbm_bytes, usable_bytes=usable, peak_flops=c.peak_flops, hbm_bw=c.hbm_bw, source=c.source)


def plan_config(config: Any, topology: Union[str, Target], *, job: str = "train", student_preset: Optional[str] = None,
                teacher_preset: Optional[str] = None, search: bool = False, search_seconds: float = 900.0,
                all_programs: bool = False, response_tokens: Optional[int] = None,
                stop_ids: Optional[tuple] = None, skip: tuple = (), phases: tuple = ("update", "rollouts"),
                source: str = "config") -> PlanReport:
    """Plan ``config`` (a :class:`sod_jax.config.Config`) for ``topology`` (``"v5e-8"``, ``"v5e:2x4"``,
    ``"8xH100"``, ``"cpu:4"`` or a :class:`~sod_jax.plan.hardware.Target`).

    ``job``: ``train`` (the RL update and the engine) or ``sft`` (the SFT step). ``search``: look
    for the largest micro-batch and slot count that fit even when the config fits (by default only
    for a part that does not); each search compiles, and starts no probe after ``search_seconds``.
    ``all_programs``: compile every engine program, not just the largest of each kind; ``skip``: engine
    programs not to compile (by name, e.g. ``("extend",)``; the report says which were left out).
    ``phases``: of an RL config, plan the ``update``, the ``rollouts`` or both (the default).
    ``response_tokens``: mean response length for the step-time estimate (default: the maximum).
    Raises :class:`~sod_jax.plan.build.PlanError` / :class:`~sod_jax.plan.hardware.TargetError`
    for a config or target it cannot plan."""
    t0 = time.perf_counter()
    target = topology if isinstance(topology, Target) else parse_target(topology)
    if target.kind == "gpu" and not gpu_matches(target, local_gpus()):
        report = plan_estimate(config, target, job=job, student_preset=student_preset, teacher_preset=teacher_preset,
                               response_tokens=response_tokens, source=source)
        report.seconds = time.perf_counter() - t0
        return report
    devices = target_devices(target)
    m = config.mesh
    try:
        mesh = parallel.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    except ValueError as e:
        raise PlanError(f"{e} (on {target.describe()})") from None
    usable = usable_hbm_bytes(target, devices)
    kw = dict(search=search, search_seconds=search_seconds, source=source)
    if job == "sft":
        report = _plan_sft(config, target, mesh, usable, student_preset=student_preset, **kw)
    else:
        report = _plan_rl(config, target, mesh, usable, student_preset=student_preset, teacher_preset=teacher_preset,
                          all_programs=all_programs, response_tokens=response_tokens, stop_ids=stop_ids, skip=skip,
                          phases=tuple(phases), **kw)
    report.seconds = time.perf_counter() - t0
    return report


def mesh_info(mesh: Any) -> dict:
    return {k: int(mesh.shape[k]) for k in ("data", "fsdp", "tensor")}


def _model_info(arch: Any) -> dict:
    c = arch.config
    return dict(source=arch.source, params=c.num_params(), dtype=c.dtype, param_dtype=c.param_dtype, remat=c.remat)


def _verdict(fits: Optional[bool], peak: Optional[int], usable: Optional[int], problems: list[str],
             knobs: list[Knob]) -> str:
    if fits and usable is None:
        return f"compiles; peak {gib(peak)} per device (no chip memory to check against)"
    if fits:
        return f"fits: peak {gib(peak)} of {gib(usable)} per chip"
    fixes = [f"{k.key}={k.value}" for k in knobs if k.value is not None and k.value != k.current]
    fix = f"; set {' and '.join(fixes)}" if fixes else ""
    return "does not fit: " + "; ".join(problems) + fix


def _rollout_used(reports: list, kv: int, resident: int) -> Optional[int]:
    """Bytes of the rollouts that grow with the slot count: the KV cache plus the largest engine
    program's extra bytes (for one that ran out of memory, what the compiler said it needs)."""
    used = [r.resident - resident if r.compiled else (r.needs or 0) + kv
            for r in reports if r.program != "sampling_copy" and (r.compiled or r.needs)]
    return max(used) if used else None


def _plan_rl(cfg: Any, target: Target, mesh: Any, usable: Optional[int], *, student_preset, teacher_preset, search,
             search_seconds, all_programs, response_tokens, stop_ids, skip, phases, source) -> PlanReport:
    student, teacher = rl_archs(cfg, student_preset, teacher_preset)
    progs = rl_programs_for(cfg, student, teacher, mesh, all_programs=all_programs, stop_ids=stop_ids,
                            skip=tuple(skip))
    with_update, with_rollouts = "update" in phases, "rollouts" in phases
    reports = {"update": (progs.update, compile_program(progs.update))} if with_update else {}
    for c in progs.engine_calls if with_rollouts else []:
        reports[c.label or c.program.name] = (c, compile_program(c))
    mem = rl_memory(progs, reports)
    mem["chip"] = usable
    upd = reports["update"][1] if with_update else None
    update_ok = not with_update or (upd.compiled and phase_fits(mem["resident_update"], usable))
    engine_reports = [r for label, (_, r) in reports.items() if label != "update"]
    rollout_ok = not with_rollouts or (all(r.compiled for r in engine_reports)
                                       and phase_fits(mem["resident_rollout"], usable))
    refresh_ok = mem.get("resident_refresh") is None or phase_fits(mem["resident_refresh"], usable)
    fits = update_ok and rollout_ok and refresh_ok
    problems = []
    if with_update and not upd.compiled:
        problems.append(f"the update does not compile ({upd.error})")
    elif not update_ok:
        problems.append(f"the update needs {gib(mem['resident_update'])} per chip with what stays resident")
    if not rollout_ok:
        bad = [r.label for r in engine_reports if not r.compiled]
        problems.append(f"the rollouts need {gib(mem['resident_rollout'])} per chip" if not bad
                        else f"engine programs do not compile: {', '.join(bad)}")
    knobs, at_best = [], None
    copy_base = mem["params"] + mem["optimizer"] + mem["teacher"] + mem["sampling_copy"]
    if with_update and (search or not update_ok):
        used = mem["update_extra"] if upd.compiled else upd.needs
        knobs.append(search_micro_batch(cfg, progs, usable, search_seconds, update_ok, used, mem["resident_update"]))
    if with_rollouts and (search or not rollout_ok):
        used = _rollout_used(engine_reports, mem["kv_cache"], copy_base)
        knob, at_best = search_slots(cfg, progs, usable, search_seconds, rollout_ok, stop_ids, all_programs, skip,
                                     used, mem["resident_rollout"])
        knobs.append(knob)
    if not fits and not update_ok and knobs and knobs[0].value is None and knobs[0].key.startswith("train."):
        problems.append("no micro-batch fits: raise mesh.fsdp, use model.remat=full, a bf16 teacher, shorter sequences "
                        "or a larger slice")
    r, t = cfg.rollout, cfg.train
    split, hosts = slot_split(progs), hosts_of(mesh)
    settings = dict(hosts=hosts, rows=progs.rows, length=progs.length, mini_batches=t.mini_batches,
                    micro_batch_size=t.micro_batch_size, num_slots=r.num_slots, slot_devices=split,
                    slots_per_device=-(-r.num_slots // split), slot_length=progs.engine.max_len,
                    decode_steps=r.decode_steps, n=r.n, algo=cfg.algo.name)
    models = {"student": _model_info(student)}
    if teacher is not None:
        models["teacher"] = _model_info(teacher)
    notes = [
        "between the rollouts and the update the engine frees the KV cache (every slot released); the sampling copy "
        "stays resident through the update and is replaced after it",
        f"each host runs its own engine on its own devices ({hosts} host(s) here): its rollout.num_slots={r.num_slots} "
        f"slots are split over {split} device(s) by the engine's layout, {-(-r.num_slots // split)} per device",
        f"the update is compiled for the largest length bucket, {progs.length} tokens, and {progs.rows} rows",
    ]
    if not all_programs:
        notes.append("engine: the largest call of each program is compiled (--all-programs compiles every one)")
    if not (with_update and with_rollouts):
        notes.append(f"ONLY THE {'UPDATE' if with_update else 'ROLLOUTS'} planned (phases={'+'.join(phases)}): "
                     "the other phase's memory is not in the totals")
    if skip:
        notes.append(f"NOT COMPILED (left out on request): the engine's {', '.join(skip)} program(s); the rollouts' "
                     "memory and time leave them out")
    time_progs, time_reports = progs, reports
    if at_best is not None and (not rollout_ok or knobs[-1].value != r.num_slots):
        # The rollouts' time at the largest slot count that fits (more slots, fewer waves).
        time_progs = at_best[0]
        time_reports = {k: v for k, v in reports.items() if v[0].program.name in ("update", "sampling_copy")}
        time_reports.update(at_best[1])
        notes.append(f"the step time's rollouts are estimated at rollout.num_slots={knobs[-1].value}, the largest "
                     "that fits")
    report = PlanReport(source, "train", target_info(target, usable), "compiled", mesh_info(mesh), models, settings,
                        mem, [rep.__dict__ | {"peak": rep.peak} for _, rep in reports.values()], fits,
                        _verdict(fits, mem["peak"], usable, problems, knobs)
                        + (f" (without the engine's {', '.join(skip)}: not compiled)" if skip else "")
                        + ("" if with_update and with_rollouts else f" ({'+'.join(phases)} only)"),
                        [k.__dict__ for k in knobs],
                        rl_step_time(cfg, time_progs, time_reports, target, response_tokens), notes)
    return report


def _plan_sft(cfg: Any, target: Target, mesh: Any, usable: Optional[int], *, student_preset, search, search_seconds,
              source) -> PlanReport:
    arch = sft_arch(cfg, student_preset)
    progs = sft_programs_for(cfg, arch, mesh)
    rep = compile_program(progs.step)
    params = arith.chip_bytes(progs.state.params)
    opt = arith.chip_bytes(progs.state.opt_state)
    state = arith.chip_bytes(progs.state)

    def resident(r) -> Optional[int]:
        return None if not r.compiled else state + max(0, r.peak - state)

    rep.resident = resident(rep)
    fits = rep.compiled and phase_fits(rep.resident, usable)
    mem = dict(params=params, optimizer=opt, update_extra=None if rep.resident is None else rep.resident - state,
               resident_update=rep.resident, peak=rep.resident, chip=usable)
    knobs = []
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if search or not fits:
        cands = arith.slot_candidates(batch_devices, max(cfg.sft.batch_size, batch_devices), batch_devices)

        def probe(rows: int) -> bool:
            r = compile_program(sft_programs_for(cfg, arch, mesh, rows).step)
            return r.compiled and phase_fits(resident(r), usable)

        best, tried, done = arith.largest_fitting(cands, probe, search_seconds, known={progs.rows_per_micro: fits})
        knobs.append(Knob("sft.micro_batch_rows", best, progs.rows_per_micro,
                          "packed rows per forward/backward pass bound the activations; gradients accumulate over them",
                          tried, done))
    problems = [f"the SFT step does not compile ({rep.error})" if not rep.compiled
                else f"the SFT step needs {gib(rep.resident)} per chip"]
    step_time = {}
    if target.chip.peak_flops:
        c = arch.config
        rows = progs.micro_batches * progs.rows_per_micro
        passes = arith.train_passes(c.remat)
        flops = passes * arith.forward_flops(c, rows, progs.pack_length, c.attention_block) / mesh.size
        t, bound = arith.roofline_seconds(flops, 0.0, target.chip.peak_flops, target.chip.hbm_bw)
        part = dict(name="SFT step", seconds=t, detail=f"{flops / 1e12:.1f} TFLOP per chip ({bound}-bound)")
        step_time = dict(estimate=True, total=t, parts=[part],
                         formula=["t = FLOPs / peak FLOP/s; FLOPs = A x R rows x T x "
                                  f"[L x (2 P_layer + 4 N H ctx) + 2 D V] x {passes} / {mesh.size} chips"],
                         assumptions=["every packed row full (an upper bound); weight and optimizer traffic not "
                                      "counted"])
    settings = dict(batch_size=cfg.sft.batch_size, micro_batches=progs.micro_batches,
                    rows_per_micro=progs.rows_per_micro, pack_length=progs.pack_length)
    notes = [f"the step is compiled for A = ceil(sft.batch_size / R) = {progs.micro_batches} micro-batches, the most "
             "any step can need (one conversation per packed row); the accuracy hook's engine is not planned"]
    return PlanReport(source, "sft", target_info(target, usable), "compiled", mesh_info(mesh),
                      {"student": _model_info(arch)}, settings, mem, [rep.__dict__ | {"peak": rep.peak}], fits,
                      _verdict(fits, rep.resident, usable, problems, knobs), [k.__dict__ for k in knobs], step_time,
                      notes)


__all__ = ["PlanError", "plan_config"]
