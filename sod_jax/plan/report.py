"""The plan's result: :class:`PlanReport` (a dataclass; ``to_json`` for scripts) and its text form.

Every byte figure is per chip (one device of the mesh); every time is seconds and an estimate.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

GiB = 2**30


@dataclass
class ProgramReport:
    """One compiled program: the compiler's memory analysis (bytes per chip) and cost analysis
    (FLOPs and bytes accessed per chip, loop bodies counted once), or why it did not compile."""

    label: str
    program: str
    compiled: bool
    compile_s: float = 0.0
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    error: str = ""
    needs: Optional[int] = None  # bytes the compiler said it needs, when it ran out of memory
    resident: Optional[int] = None  # everything on the chip while it runs (see the plan's notes)

    @property
    def peak(self) -> int:
        """argument + output - alias + temp + generated code: this program's own bytes while it runs."""
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclass
class Knob:
    """A setting to change and the value found for it."""

    key: str  # e.g. "train.micro_batch_size"
    value: Optional[int]  # the largest that fits (None: none does)
    current: int
    why: str
    tried: dict = field(default_factory=dict)  # value -> fits, as measured
    complete: bool = True  # False: the time bound stopped the search first
    method: str = "compiled"  # compiled | formula
    resident: dict = field(default_factory=dict)  # value -> bytes per chip of its phase, where measured


@dataclass
class PlanReport:
    """What :func:`sod_jax.plan.plan_config` found. ``memory`` holds bytes per chip by item (see
    :data:`MEMORY_ITEMS`); ``step_time`` seconds by part plus ``formula`` and ``assumptions``."""

    config: str
    job: str  # "train" | "sft"
    target: dict
    method: str  # "compiled" (XLA compiled every program for the target) | "estimate" (formulas only)
    mesh: dict
    models: dict
    settings: dict
    memory: dict
    programs: list
    fits: Optional[bool]
    verdict: str
    knobs: list = field(default_factory=list)
    step_time: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def program(self, name: str) -> Optional[dict]:
        """The first program report of program ``name`` (e.g. ``"update"``, ``"decode"``)."""
        return next((p for p in self.programs if p["program"] == name), None)


# label, key in PlanReport.memory
MEMORY_ITEMS = [
    ("params (master weights)", "params"),
    ("optimizer state", "optimizer"),
    ("teacher weights", "teacher"),
    ("update: batch + temporaries", "update_extra"),
    ("sampling copy of the weights", "sampling_copy"),
    ("KV cache + slot state", "kv_cache"),
    ("rollout programs' temporaries (largest)", "rollout_extra"),
    ("= resident during the update", "resident_update"),
    ("= resident during the rollouts", "resident_rollout"),
    ("peak", "peak"),
    ("chip memory (usable per the compiler)", "chip"),
]


def gib(x: Optional[float]) -> str:
    """Bytes in GiB (MiB or KiB below one GiB / MiB)."""
    if x is None:
        return "-"
    if abs(x) >= GiB:
        return f"{x / GiB:.2f} GiB"
    if abs(x) >= 2**20:
        return f"{x / 2**20:.1f} MiB"
    return f"{x / 2**10:.1f} KiB"


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def seconds(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 120:
        return f"{x / 60:.1f} min"
    if x >= 1:
        return f"{x:.1f} s"
    return f"{x * 1e3:.1f} ms"


def format_text(r: PlanReport) -> str:
    """The human-readable report."""
    t = r.target
    lines = [f"plan: {r.config} ({r.job}) on {t['describe']}",
             "method: " + ("compiled for the target by XLA (compile-only, nothing allocated)" if r.method == "compiled"
                           else "ARITHMETIC ESTIMATE (formulas; nothing compiled for this target)"),
             f"mesh: data={r.mesh['data']} fsdp={r.mesh['fsdp']} tensor={r.mesh['tensor']} over {t['chips']} chips"]
    for role, m in r.models.items():
        lines.append(f"{role}: {count(m['params'])} params ({m['param_dtype']} master, {m['dtype']} compute) from "
                     f"{m['source']}")
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in r.settings.items()))
    lines.append("")
    lines.append("memory per chip:")
    for label, key in MEMORY_ITEMS:
        if key in r.memory:
            lines.append(f"  {label:<42} {gib(r.memory[key]):>12}")
    if r.programs:
        lines.append("")
        lines.append("programs (per chip; compiler's memory analysis):")
        for p in r.programs:
            if p["compiled"]:
                lines.append(f"  {p['label']:<36} args {gib(p['argument']):>10}  temp {gib(p['temp']):>10}  "
                             f"out-alias {gib(p['output'] - p['alias']):>10}  compiled in {p['compile_s']:.0f} s")
            else:
                need = f" (needs {gib(p['needs'])})" if p.get("needs") else ""
                lines.append(f"  {p['label']:<36} DOES NOT COMPILE{need}: {p['error']}")
    lines.append("")
    lines.append(f"verdict: {r.verdict}")
    for k in r.knobs:
        val = "none fits" if k["value"] is None else f"{k['key']}={k['value']}"
        at = k.get("resident", {}).get(k["value"])
        if at is not None:
            val += f" ({gib(at)} resident)"
        bound = "" if k["complete"] else " (search stopped by its time bound; larger values untried)"
        tried = ", ".join(f"{v}:{'fits' if ok else 'no'}" for v, ok in sorted(k["tried"].items()))
        lines.append(f"  knob: {k['key']} (now {k['current']}): largest that fits: {val}{bound} "
                     f"[{k['method']}; {tried}]")
        lines.append(f"        {k['why']}")
    st = r.step_time
    if st:
        lines.append("")
        lines.append("estimated step time (ESTIMATE, roofline per chip: "
                     "max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)):")
        for part in st.get("parts", []):
            lines.append(f"  {part['name']:<34} {seconds(part['seconds']):>10}  {part.get('detail', '')}")
        lines.append(f"  {'total':<34} {seconds(st.get('total')):>10}")
        if st.get("total_with_decode_floor") is not None:
            lines.append(f"  {'total, decode at its HBM floor':<34} {seconds(st['total_with_decode_floor']):>10}  "
                         "(every decode step reading the sampling copy and KV cache once)")
        for f in st.get("formula", []):
            lines.append(f"  formula: {f}")
        for a in st.get("assumptions", []):
            lines.append(f"  assumes: {a}")
    if r.notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in r.notes)
    lines.append(f"(planned in {r.seconds:.0f} s)")
    return "\n".join(lines)


__all__ = ["Knob", "MEMORY_ITEMS", "PlanReport", "ProgramReport", "format_text", "gib", "seconds"]
