"""The arithmetic estimate for a GPU count that is not on this host (``8xH100``): nothing is
compiled for it, and the report says so.

Resident trees (weights, optimizer state, teacher, sampling copy, KV cache) are sized exactly: the
same abstract trees the compiled plan uses, sharded by the same rules on an abstract mesh of the
target's device count. Temporaries are formulas (:func:`sod_jax.plan.arith.train_activation_bytes`
and the notes below), and the largest micro-batch and slot count are found with those formulas.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from jax.sharding import AbstractMesh

from sod_jax import parallel
from sod_jax.plan import arith
from sod_jax.plan.build import build_engine, rl_archs, rl_programs_for, sft_arch, sft_programs_for
from sod_jax.plan.hardware import GPU_DEFAULT_MEM_FRACTION, Target
from sod_jax.plan.planner import state_split
from sod_jax.plan.report import Knob, PlanReport, gib

METHOD_NOTE = ("ARITHMETIC ESTIMATE for {name}: no {chip} is on this host, so nothing was compiled for it; weights, "
               "optimizer state, teacher, sampling copy and KV cache are sized by the trainer's sharding rules, "
               "temporaries by formula. Run the planner on a machine with the GPUs for the compiler's figures.")


def _usable(target: Target) -> tuple[int, float]:
    import os

    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_DEFAULT_MEM_FRACTION))
    return int(target.chip.hbm_bytes * frac), frac


def _update_extra(cfg: Any, progs: Any, micro: int, batch_devices: int) -> dict[str, float]:
    """Per-chip bytes of the update beyond the resident trees: batch, one micro-batch's activations,
    the fp32 gradient (and its accumulator with more than one micro-batch) and the optimizer's update."""
    s = progs.student.arch.config
    rows = max(micro / batch_devices, 1.0)
    act = arith.train_activation_bytes(s, rows, progs.length, remat=s.remat, compute_bytes=arith.itemsize(s.dtype),
                                       logprob_chunk=cfg.model.logprob_chunk, block=s.attention_block)
    grads = arith.chip_bytes(progs.state.params) * 4 // arith.itemsize(s.param_dtype)
    K = (progs.rows // progs.spec.mini_batches) // micro
    return dict(batch=arith.chip_bytes(progs.batch), gradients=grads * (2 if K > 1 else 1), optimizer_update=grads,
                **act)


def _decode_extra(s: Any, slots_per_chip: int, kv_chip: int) -> int:
    """Decode temporaries: fp32 logits and sampling buffers (3 x slots x V x 4) plus twice the chip's KV
    cache: the TPU compile of the same program needs 2.2x (Qwen3-0.6B, 4 slots of 23,040 tokens per
    v5e chip: 21.7 GiB of temporaries beside a 9.8 GiB cache)."""
    return 3 * slots_per_chip * s.vocab_size * 4 + 2 * kv_chip


def plan_estimate(cfg: Any, target: Target, *, job: str = "train", student_preset: Optional[str] = None,
                  teacher_preset: Optional[str] = None, response_tokens: Optional[int] = None,
                  source: str = "config") -> PlanReport:
    usable, frac = _usable(target)
    shape = parallel.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, target.chips)
    mesh = AbstractMesh(shape, parallel.MESH_AXES)
    batch_devices = shape[0] * shape[1]
    tinfo = dict(name=target.name, describe=target.describe(), chips=target.chips, chip=target.chip.name,
                 topology=None, hbm_bytes=target.chip.hbm_bytes, usable_bytes=usable,
                 peak_flops=target.chip.peak_flops, hbm_bw=target.chip.hbm_bw, source=target.chip.source)
    notes = [METHOD_NOTE.format(name=target.name, chip=target.chip.name),
             f"usable memory: {frac:.0%} of {gib(target.chip.hbm_bytes)} (JAX's default GPU preallocation; "
             "XLA_PYTHON_CLIENT_MEM_FRACTION changes it)"]
    mesh_d = dict(zip(("data", "fsdp", "tensor"), shape))
    if job == "sft":
        return _sft_estimate(cfg, target, mesh, tinfo, mesh_d, usable, notes, student_preset, source)
    student, teacher = rl_archs(cfg, student_preset, teacher_preset)
    progs = rl_programs_for(cfg, student, teacher, mesh, with_engine=True)
    s = student.config
    base = arith.chip_bytes(progs.state) + (arith.chip_bytes(progs.teacher.params) if teacher else 0)
    copy = arith.chip_bytes(progs.sampling)

    def update_resident(micro: int) -> int:
        return int(base + copy + sum(_update_extra(cfg, progs, micro, batch_devices).values()))

    def kv_chip(slots: int) -> tuple[int, int]:
        state = _state_on_mesh(build_engine(cfg, progs.student, slots)[0])
        return arith.chip_bytes(state), state_split(state)

    def rollout_resident(slots: int) -> int:
        kv, split = kv_chip(slots)
        return int(base + copy + kv + _decode_extra(s, math.ceil(slots / split), kv))

    rows_per_mini = progs.rows // progs.spec.mini_batches
    micro = progs.spec.micro_batch_size or rows_per_mini
    slots = int(cfg.rollout.num_slots)
    kv, split = kv_chip(slots)
    res_u, res_r = update_resident(micro), rollout_resident(slots)
    extra = _update_extra(cfg, progs, micro, batch_devices)
    mem = dict(params=arith.chip_bytes(progs.state.params), optimizer=arith.chip_bytes(progs.state.opt_state),
               teacher=arith.chip_bytes(progs.teacher.params) if teacher else 0, update_extra=res_u - base - copy,
               sampling_copy=copy, kv_cache=kv, rollout_extra=res_r - base - copy - kv, resident_update=res_u,
               resident_rollout=res_r, peak=max(res_u, res_r), chip=usable, update_terms=extra)
    fits = mem["peak"] <= usable
    cands = arith.micro_batch_candidates(rows_per_mini, batch_devices)
    mb_fit = [c for c in cands if update_resident(c) <= usable]
    step = split if split > 1 else 1
    slot_c = arith.slot_candidates(cfg.rollout.n, max(slots, -(-progs.rows // step) * step), step)
    best_s, tried_s, _ = arith.largest_fitting(slot_c, lambda x: rollout_resident(x) <= usable, 1e9)
    knobs = [Knob("train.micro_batch_size", max(mb_fit) if mb_fit else None, micro,
                  "rows per micro-batch bound the update's activations", {c: c in mb_fit for c in cands}, True,
                  "formula"),
             Knob("rollout.num_slots", best_s, slots, "each slot holds one trajectory's KV cache", tried_s, True,
                  "formula")]
    verdict = (f"fits (estimate): peak {gib(mem['peak'])} of {gib(usable)} per GPU" if fits else
               f"does not fit (estimate): peak {gib(mem['peak'])} of {gib(usable)} per GPU; largest that fit: "
               f"train.micro_batch_size={knobs[0].value}, rollout.num_slots={knobs[1].value}")
    step_time = _rl_time(cfg, progs, target, slots, split, kv, copy, response_tokens)
    settings = dict(rows=progs.rows, length=progs.length, mini_batches=progs.spec.mini_batches,
                    micro_batch_size=cfg.train.micro_batch_size, num_slots=slots, slot_devices=split,
                    slots_per_device=-(-slots // split), slot_length=progs.engine.max_len,
                    decode_steps=cfg.rollout.decode_steps, n=cfg.rollout.n, algo=cfg.algo.name)
    models = {"student": _model(student)} | ({"teacher": _model(teacher)} if teacher else {})
    notes.append(f"update temporaries by formula: {', '.join(f'{k} {gib(v)}' for k, v in extra.items())}")
    notes.append("decode temporaries by formula: 3 x fp32 logits per slot + twice the chip's KV cache (what the TPU "
                 "compile of the same decode needs)")
    return PlanReport(source, "train", tinfo, "estimate", mesh_d, models, settings, mem, [], fits, verdict,
                      [k.__dict__ for k in knobs], step_time, notes)


def _state_on_mesh(engine: Any) -> Any:
    """The engine's slot state with the sharding its programs see it with."""
    from sod_jax.rollout.engine import SlotState

    for c in engine.program_calls([]):
        for a in c.args:
            if isinstance(a, SlotState):
                return a
    return engine.state_shapes()


def _model(arch: Any) -> dict:
    c = arch.config
    return dict(source=arch.source, params=c.num_params(), dtype=c.dtype, param_dtype=c.param_dtype, remat=c.remat)


def _rl_time(cfg: Any, progs: Any, target: Target, slots: int, split: int, kv: int, copy: int,
             response_tokens: Optional[int]) -> dict:
    """Roofline times by formula: update FLOPs as in the compiled plan; a decode step reads the
    sampling copy and the chip's KV cache and does 2 x params FLOPs per slot plus full-window attention."""
    chip, n_dev = target.chip, target.chips
    s = progs.student.arch.config
    t = None if progs.teacher is None else progs.teacher.arch.config
    r = cfg.rollout
    fl = arith.update_flops(s, t, progs.rows, progs.length, epochs=progs.spec.epochs, remat=s.remat,
                            student_block=s.attention_block, teacher_block=0 if t is None else t.attention_block)
    t_up, _ = arith.roofline_seconds(sum(fl.values()) / n_dev, 0.0, chip.peak_flops, chip.hbm_bw)
    per_chip = math.ceil(slots / split)
    step_flops = arith.forward_flops(s, per_chip, 1, 0) + per_chip * s.num_hidden_layers * 4 * s.num_attention_heads * \
        s.head_dim * progs.engine.max_len
    t_step, _ = arith.roofline_seconds(step_flops, copy + kv, chip.peak_flops, chip.hbm_bw)
    resp = int(response_tokens or r.max_response_length)
    ro = arith.rollout_seconds(prompts=cfg.train.prompts_per_step, n=r.n, slots=slots, response_tokens=resp,
                               decode_steps=r.decode_steps, tool_turns=max(0, r.max_assistant_turns - 1),
                               t_decode_step=t_step, t_extend=0.0, t_prefill=0.0, t_insert=0.0, prompts_per_prefill=1)
    parts = [dict(name="rollouts: decode", seconds=ro["decode"],
                  detail=f"{ro['waves']:.0f} waves, {t_step * 1e3:.2f} ms/step"),
             dict(name="update", seconds=t_up, detail=f"{sum(fl.values()) / n_dev / 1e12:.1f} TFLOP per GPU")]
    return dict(estimate=True, total=sum(p["seconds"] for p in parts), parts=parts,
                formula=[f"t = max(FLOPs / {chip.peak_flops / 1e12:.0f} TFLOP/s, bytes / {chip.hbm_bw / 1e9:.0f} GB/s) "
                         f"({chip.name}, {chip.source})",
                         "decode step per GPU: FLOPs = slots/GPU x [L x (2 P_layer + 4 N H x slot length) + 2 D V], "
                         "bytes = sampling copy + the GPU's KV cache; update FLOPs as in the compiled plan"],
                assumptions=[f"every trajectory has {resp} response tokens, all decoded; extensions, prefill and "
                             "host time not counted"])


def _sft_estimate(cfg, target, mesh, tinfo, mesh_d, usable, notes, student_preset, source) -> PlanReport:
    arch = sft_arch(cfg, student_preset)
    batch_devices = mesh_d["data"] * mesh_d["fsdp"]

    def resident(rows: int) -> tuple[int, Any]:
        p = sft_programs_for(cfg, arch, mesh, rows)
        c = arch.config
        act = arith.train_activation_bytes(c, max(rows / batch_devices, 1.0), p.pack_length, remat=c.remat,
                                           compute_bytes=arith.itemsize(c.dtype), logprob_chunk=cfg.model.logprob_chunk,
                                           block=c.attention_block)
        grads = arith.chip_bytes(p.state.params) * 4 // arith.itemsize(c.param_dtype)
        return int(arith.chip_bytes(p.state) + arith.chip_bytes(p.batch) + sum(act.values()) + 3 * grads), p

    res, p = resident(0)
    fits = res <= usable
    cands = arith.slot_candidates(batch_devices, max(cfg.sft.batch_size, batch_devices), batch_devices)
    best, tried, _ = arith.largest_fitting(cands, lambda x: resident(x)[0] <= usable, 1e9)
    mem = dict(params=arith.chip_bytes(p.state.params), optimizer=arith.chip_bytes(p.state.opt_state),
               update_extra=res - arith.chip_bytes(p.state), resident_update=res, peak=res, chip=usable)
    verdict = (f"fits (estimate): {gib(res)} of {gib(usable)} per GPU" if fits
               else f"does not fit (estimate): {gib(res)} of {gib(usable)} per GPU; sft.micro_batch_rows={best} fits")
    knobs = [Knob("sft.micro_batch_rows", best, p.rows_per_micro, "packed rows per pass bound the activations",
                  tried, True, "formula").__dict__]
    return PlanReport(source, "sft", tinfo, "estimate", mesh_d, {"student": _model(arch)},
                      dict(batch_size=cfg.sft.batch_size, rows_per_micro=p.rows_per_micro, pack_length=p.pack_length),
                      mem, [], fits, verdict, knobs, {}, notes)


__all__ = ["plan_estimate"]
