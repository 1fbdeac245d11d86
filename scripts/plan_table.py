"""The planner's table for the paper's settings: Qwen3-0.6B and 1.7B SOD students with the Qwen3-4B
teacher, 64 prompts x 16 rollouts, 2,560 + 20,480 tokens, on v5e-8, v5p-8, v6e-8 and v4-32 (compiled
with the compile-only TPU client) and 8 x H100 (an arithmetic estimate).

Every row runs ``sod_jax.plan.plan_config`` with the search on (the largest ``train.micro_batch_size``
and ``rollout.num_slots`` that fit, found by compiling), starting from one row per chip per
micro-batch and ``--start-slots`` slots; each row is stored in the JSON file as soon as it is done,
so a rerun resumes with the rows still missing. A row that fails is stored with its error and
retried by the next run.

Each row runs in a child process whose heap is capped (``--host-memory-gb``): XLA's TPU compiler can
need more host memory than a small machine has for the engine's extension program at many slots,
and a capped child then ends alone instead of the machine's out-of-memory killer picking a process.
A row whose child dies that way is planned again without the extension program (the table says so).
Compiling the paper's update takes minutes per compile on a small host; run it in the background:

    nice -n 19 python scripts/plan_table.py --out docs/plan_table.json > plan_table.log 2>&1 &
    python scripts/plan_table.py --out docs/plan_table.json --markdown   # the table, from the file only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU rows use the compile-only client, not a TPU

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STUDENTS = {"0.6b": "configs/sod_qwen3_0.6b.yaml", "1.7b": "configs/sod_qwen3_1.7b.yaml"}
TARGETS = ["v5e-8", "v5p-8", "v6e-8", "v4-32", "8xH100"]
GiB = 2**30


def row_key(student: str, target: str) -> str:
    return f"{student}/{target}"


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, rows: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def start_overrides(target: str, start_slots: int) -> list[str]:
    """One row per chip per micro-batch to start from (it fits where anything does) and a small slot count."""
    from sod_jax.plan.hardware import parse_target

    chips = parse_target(target).chips
    return [f"train.micro_batch_size={chips}", f"rollout.num_slots={start_slots}"]


def plan_row(student: str, target: str, args, skip: tuple = ()) -> dict:
    from sod_jax.config import load_config
    from sod_jax.plan import plan_config

    config = STUDENTS[student]
    overrides = start_overrides(target, args.start_slots)
    command = (f"python -m sod_jax.plan --config {config} --topology {target} --search "
               f"--search-seconds {args.search_seconds:.0f}{''.join(f' --skip {p}' for p in skip)} "
               f"{' '.join(overrides)}")
    cfg = load_config(REPO / config, overrides)
    t0 = time.time()
    r = plan_config(cfg, target, search=True, search_seconds=args.search_seconds, skip=skip, source=config)
    knobs = {k["key"]: k for k in r.knobs}
    mb, slots = knobs.get("train.micro_batch_size", {}), knobs.get("rollout.num_slots", {})
    mem = r.memory
    return dict(
        status="done", command=command, method=r.method, fits=r.fits, verdict=r.verdict,
        chips=r.target["chips"], chip_gib=(mem.get("chip") or 0) / GiB,
        micro_batch_size=mb.get("value"), micro_batch_complete=mb.get("complete"),
        resident_update_gib=_at(mb, mem.get("resident_update")),
        num_slots=slots.get("value"), slots_complete=slots.get("complete"),
        resident_rollout_gib=_at(slots, mem.get("resident_rollout")),
        slots_per_device=None if slots.get("value") is None else -(-slots["value"] // r.settings["slot_devices"]),
        step_time_s=r.step_time.get("total"), step_time_decode_floor_s=r.step_time.get("total_with_decode_floor"),
        skipped=list(skip), plan_seconds=time.time() - t0, report=r.to_dict())


def run_child(key: str, args, skip: tuple) -> tuple[dict | None, str]:
    """Plan one row in a child process with a capped heap; (row or None, the last compile it began)."""
    import resource
    import subprocess
    import tempfile

    limit = int(args.host_memory_gb * 2**30)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        row_file = f.name
    cmd = [sys.executable, __file__, "--child", key, "--row-out", row_file, "--search-seconds",
           str(args.search_seconds), "--start-slots", str(args.start_slots)] + [a for p in skip for a in ("--skip", p)]
    if args.students:
        cmd += ["--students", args.students]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
    last = ""
    for line in proc.stderr:  # pass the child's progress through, keep the last compile it began
        sys.stderr.write(line)
        if "compiling " in line:
            last = line.strip().split("compiling ", 1)[1]
    rc = proc.wait()
    row = json.loads(Path(row_file).read_text()) if rc == 0 and Path(row_file).stat().st_size else None
    Path(row_file).unlink(missing_ok=True)
    return row, (last if rc else "")


def _at(knob: dict, fallback) -> float | None:
    """Resident GiB at the knob's value where a compile measured it (else the config's own)."""
    res = knob.get("resident", {})
    value = res.get(knob.get("value"), res.get(str(knob.get("value"))))
    value = value if value is not None else fallback
    return None if value is None else value / GiB


def markdown(rows: dict) -> str:
    head = ("| student | target | method | fits at the start values | largest micro-batch | resident in the update "
            "| largest slots (per device) | resident in the rollouts | chip memory | est. step time "
            "(decode at HBM floor) |")
    lines = [head, "|" + "---|" * 10]
    for student in STUDENTS:
        for target in TARGETS:
            r = rows.get(row_key(student, target))
            if not r or r.get("status") != "done":
                why = "not computed" if not r else f"not computed ({r.get('error', 'failed')[:80]})"
                lines.append(f"| {student} | {target} | {why} |" + " |" * 7)
                continue
            g = lambda x: "-" if x is None else f"{x:.1f} GiB"  # noqa: E731
            t = lambda x: "-" if x is None else (f"{x / 60:.1f} min" if x >= 120 else f"{x:.0f} s")  # noqa: E731
            mb = "none" if r["micro_batch_size"] is None else str(r["micro_batch_size"])
            sl = "none" if r["num_slots"] is None else f"{r['num_slots']} ({r['slots_per_device']})"
            method = "compiled" if r["method"] == "compiled" else "**estimate**"
            if r.get("skipped"):
                method += f" (no {', '.join(r['skipped'])}: its compile needs more host memory than here)"
            programs = r["report"]["programs"]
            if r["num_slots"] is None and any(not p["compiled"] for p in programs if p["program"] != "update"):
                r = dict(r, step_time_s=None, step_time_decode_floor_s=None)  # no slot count fits: no rollouts
            lines.append(f"| {student} | {target} | {method} | {'yes' if r['fits'] else 'no'} | {mb} | "
                         f"{g(r['resident_update_gib'])} | {sl} | {g(r['resident_rollout_gib'])} | "
                         f"{g(r['chip_gib'])} | {t(r['step_time_s'])} ({t(r['step_time_decode_floor_s'])}) |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "plan_table.json"), help="the JSON file of rows (resumed)")
    p.add_argument("--rows", default="", help="comma-separated student/target keys to plan (default: all)")
    p.add_argument("--search-seconds", type=float, default=1200.0, help="per knob: no new compile after this")
    p.add_argument("--start-slots", type=int, default=32, help="rollout.num_slots to start each search from")
    p.add_argument("--markdown", action="store_true", help="print the table from the file and exit")
    p.add_argument("--students", default="", help="NAME=CONFIG,... instead of the paper's two students")
    p.add_argument("--targets", default="", help="comma-separated targets instead of the paper's five")
    p.add_argument("--host-memory-gb", type=float, default=14.0, help="heap cap of each row's child process")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--skip", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.students:
        STUDENTS.clear()
        STUDENTS.update(dict(item.split("=", 1) for item in args.students.split(",")))
    if args.targets:
        TARGETS[:] = args.targets.split(",")
    if args.child:  # one row, in the child process run_child starts
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("sod_jax.plan").setLevel(logging.INFO)
        student, target = args.child.split("/")
        Path(args.row_out).write_text(json.dumps(plan_row(student, target, args, tuple(args.skip)), default=str))
        return 0
    out = Path(args.out)
    rows = load(out)
    if args.markdown:
        print(markdown(rows))
        return 0
    wanted = [k for k in args.rows.split(",") if k] or [row_key(s, t) for s in STUDENTS for t in TARGETS]
    for key in wanted:
        if rows.get(key, {}).get("status") == "done":
            print(f"{key}: done before, kept", flush=True)
            continue
        print(f"{key}: planning ...", flush=True)
        t0 = time.time()
        try:
            row, died_in = run_child(key, args, ())
            if row is None and died_in.startswith("extend"):
                print(f"{key}: the child died compiling {died_in}; planning again without the extension program",
                      flush=True)
                row, died_in = run_child(key, args, ("extend",))
            rows[key] = row or dict(status="error", error=f"the planner's process died while compiling {died_in} "
                                                           f"(host memory cap {args.host_memory_gb:.0f} GB)")
        except Exception as e:  # noqa: BLE001 - a failed row is stored and retried by the next run
            rows[key] = dict(status="error", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-4000:])
        save(out, rows)
        r = rows[key]
        print(f"{key}: {r['status']} in {time.time() - t0:.0f} s: {r.get('verdict', r.get('error'))}", flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
