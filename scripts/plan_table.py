"""The planner's table for the paper's settings: Qwen3-0.6B and 1.7B SOD students with the Qwen3-4B
teacher, 64 prompts x 16 rollouts, 2,560 + 20,480 tokens, on v5e-8, v5p-8, v6e-8 and v4-32 (compiled
with the compile-only TPU client) and 8 x H100 (an arithmetic estimate).

For each TPU row the largest ``train.micro_batch_size`` and ``rollout.num_slots`` that fit are found
by compiling: every compile set is one ``python -m sod_jax.plan --only update|rollouts --json`` run
in a child process with a capped heap (``--host-memory-gb``), because XLA's TPU compiler can need
more host memory for the paper's engine programs than a small machine has; a child that dies of it
counts as "does not fit here" and the table says so. The search starts from one row per chip per
micro-batch and ``--start-slots`` slots, probes where the bytes measured so far predict the
boundary, then bisects (``sod_jax.plan.arith.largest_fitting``). Every probe's result is stored in
the JSON file as soon as it is known, so a rerun resumes where the last one stopped; a finished row
is kept. The GPU row is ``plan_config``'s arithmetic estimate.

Compiling the paper's update takes minutes per compile on a small host; run it in the background:

    nice -n 19 python scripts/plan_table.py --out docs/plan_table.json > plan_table.log 2>&1 &
    python scripts/plan_table.py --out docs/plan_table.json --markdown   # the table, from the file only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU rows use the compile-only client, not a TPU

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sod_jax.plan import arith  # noqa: E402

STUDENTS = {"0.6b": "configs/sod_qwen3_0.6b.yaml", "1.7b": "configs/sod_qwen3_1.7b.yaml"}
TARGETS = ["v5e-8", "v5p-8", "v6e-8", "v4-32", "8xH100"]
GiB = 2**30


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, rows: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def _summary(report: dict, phase: str) -> dict:
    """What a probe keeps of a child's report: the verdict, the phase's bytes per chip, the programs'
    memory and the step-time estimate (the rollouts' child estimates the update too, by formula)."""
    m = report["memory"]
    key = "resident_update" if phase == "update" else "resident_rollout"
    needs = [p.get("needs") for p in report["programs"] if not p["compiled"] and p.get("needs")]
    return dict(fits=report["fits"], resident=m.get(key), needs=max(needs) if needs else None, memory=m,
                settings=report["settings"], chip=m.get("chip"), verdict=report["verdict"],
                programs=[{k: p[k] for k in ("label", "compiled", "argument", "temp", "output", "alias", "needs",
                                             "flops", "bytes_accessed", "compile_s")} for p in report["programs"]],
                step_time=report.get("step_time", {}))


class Row:
    """One student x target: its probes (stored in the table file as they finish) and its search."""

    def __init__(self, key: str, rows: dict, out: Path, args):
        self.key, self.rows, self.out, self.args = key, rows, out, args
        self.student, self.target = key.split("/")
        self.data = rows.setdefault(key, {})
        self.data.setdefault("probes", {})
        self.data["status"] = "running"

    def command(self, phase: str, overrides: list[str]) -> list[str]:
        return ["python", "-m", "sod_jax.plan", "--config", STUDENTS[self.student], "--topology", self.target,
                "--only", phase, "--json", *overrides]

    def probe(self, phase: str, micro: int, slots: int) -> dict | None:
        """The child's summary for these settings (None: the child died, e.g. of the heap cap)."""
        name = f"{phase}:{micro}:{slots}"
        known = self.data["probes"].get(name)
        if known is not None and not (known.get("died") and known.get("heap_gb", 0) < self.args.host_memory_gb):
            return None if known.get("died") else known
        overrides = [f"train.micro_batch_size={micro}", f"rollout.num_slots={slots}"]
        cmd = self.command(phase, overrides)
        limit = int(self.args.host_memory_gb * GiB)
        t0 = time.time()
        print(f"{self.key}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, capture_output=True, text=True,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
        sys.stderr.write(p.stderr[-2000:])
        result = None
        if p.returncode in (0, 3) and p.stdout.strip():
            result = _summary(json.loads(p.stdout), phase)
        else:
            last = [ln for ln in p.stderr.splitlines() if "compiling " in ln]
            result = dict(died=True, returncode=p.returncode, fits=False,
                          compiling=last[-1].split("compiling ", 1)[1] if last else "")
        # A child that died is tried again by a later run with a larger --host-memory-gb.
        result.update(command=" ".join(cmd), seconds=time.time() - t0, heap_gb=self.args.host_memory_gb)
        self.data["probes"][name] = result
        save(self.out, self.rows)
        print(f"{self.key}: {name}: {'DIED (' + result['compiling'] + ')' if result.get('died') else result['verdict']}"
              f" in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
        return None if result.get("died") else result

    def search(self, phase: str, cands: list[int], start: int, fixed: int) -> tuple[int | None, dict, bool]:
        """The largest of ``cands`` whose ``phase`` fits, from ``start`` (the other knob held at ``fixed``)."""
        points = []

        def fits(v: int) -> bool:
            r = self.probe(phase, v if phase == "update" else fixed, v if phase == "rollouts" else fixed)
            if r is None:
                return False
            used = r["resident"] if r["resident"] is not None else (r["needs"] or 0) + (r["chip"] or 0) // 8
            if used:
                points.append((v, used))
            return bool(r["fits"])

        def predict() -> float | None:
            room = next((self.data["probes"][k]["chip"] for k in self.data["probes"]
                         if not self.data["probes"][k].get("died")), None)
            if not points or not room:
                return None
            (x1, y1) = points[-1]
            if len(points) >= 2 and points[-2][0] != x1 and (y1 - points[-2][1]) * (x1 - points[-2][0]) > 0:
                x0, y0 = points[-2]
                return x1 + (room - y1) * (x1 - x0) / (y1 - y0)
            return x1 * room / y1

        known = {start: fits(start)}
        return arith.largest_fitting(cands, fits, self.args.search_seconds, known=known, predict=predict)

    def run(self) -> None:
        from sod_jax.plan.hardware import parse_target

        chips = parse_target(self.target).chips
        micro0, slots0 = chips, self.args.start_slots
        first = self.probe("rollouts", micro0, slots0)
        if first is None:
            raise RuntimeError(f"the rollouts at {slots0} slots could not be compiled here (child died under a "
                               f"{self.args.host_memory_gb:g} GB heap cap; rerun with a larger --host-memory-gb)")
        s = first["settings"]
        rows_per_mini = s["rows"] // s["mini_batches"]
        mb_best, mb_tried, mb_done = self.search("update", arith.micro_batch_candidates(rows_per_mini, chips),
                                                 micro0, slots0)
        step = s["slot_devices"]
        cap = -(-(s["rows"] // s["hosts"]) // step) * step
        sl_best, sl_tried, sl_done = self.search("rollouts", arith.slot_candidates(s["n"], max(cap, slots0), step),
                                                 slots0, micro0)
        died = sorted(k for k, v in self.data["probes"].items() if v.get("died"))
        upd = self.data["probes"].get(f"update:{mb_best}:{slots0}") if mb_best else None
        ro = self.data["probes"].get(f"rollouts:{micro0}:{sl_best}") if sl_best else None
        self.data.update(
            status="done", method="compiled", chips=chips, chip_gib=(first["chip"] or 0) / GiB,
            fits=bool(first["fits"]) and bool(self.data["probes"].get(f"update:{micro0}:{slots0}", {}).get("fits")),
            micro_batch_size=mb_best, micro_batch_tried=mb_tried, micro_batch_complete=mb_done,
            resident_update_gib=None if not upd else upd["resident"] / GiB,
            num_slots=sl_best, slots_tried=sl_tried, slots_complete=sl_done,
            slots_per_device=None if sl_best is None else -(-sl_best // step),
            resident_rollout_gib=None if not ro else ro["resident"] / GiB,
            step_time_s=None if not ro else ro["step_time"].get("total"),
            step_time_decode_floor_s=None if not ro else ro["step_time"].get("total_with_decode_floor"),
            host_memory_limited=died, host_memory_gb=self.args.host_memory_gb)
        save(self.out, self.rows)


def estimate_row(key: str, rows: dict, out: Path, args) -> None:
    from sod_jax.config import load_config
    from sod_jax.plan import plan_config

    student, target = key.split("/")
    chips = int(target.split("x")[0])
    overrides = [f"train.micro_batch_size={chips}", f"rollout.num_slots={args.start_slots}"]
    r = plan_config(load_config(REPO / STUDENTS[student], overrides), target, source=STUDENTS[student])
    knobs = {k["key"]: k for k in r.knobs}
    mb, sl = knobs["train.micro_batch_size"]["value"], knobs["rollout.num_slots"]["value"]
    best = [f"train.micro_batch_size={mb or chips}", f"rollout.num_slots={sl or args.start_slots}"]
    at = plan_config(load_config(REPO / STUDENTS[student], best), target, source=STUDENTS[student])
    rows[key] = dict(
        status="done", method="estimate", chips=chips, chip_gib=r.memory["chip"] / GiB, fits=r.fits,
        command=f"python -m sod_jax.plan --config {STUDENTS[student]} --topology {target} {' '.join(best)}",
        micro_batch_size=mb, num_slots=sl,
        slots_per_device=None if sl is None else -(-sl // at.settings["slot_devices"]),
        resident_update_gib=at.memory["resident_update"] / GiB,
        resident_rollout_gib=at.memory["resident_rollout"] / GiB,
        step_time_s=at.step_time.get("total"), step_time_decode_floor_s=None, host_memory_limited=[],
        report=at.to_dict())
    save(out, rows)


def markdown(rows: dict) -> str:
    head = ("| student | target | method | fits at the start values | largest micro-batch | resident in the update "
            "| largest slots (per device) | resident in the rollouts | chip memory | est. step time "
            "(decode at HBM floor) |")
    lines = [head, "|" + "---|" * 10]
    g = lambda x: "-" if x is None else f"{x:.1f} GiB"  # noqa: E731
    t = lambda x: "-" if x is None else (f"{x / 60:.0f} min" if x >= 120 else f"{x:.0f} s")  # noqa: E731

    def times(r: dict) -> str:
        # The GPU estimate's decode is priced at the HBM floor only (no XLA cost model without the
        # compiler), so its one figure belongs in the parenthesised column of the compiled rows.
        if r["method"] == "estimate":
            return f"- ({t(r['step_time_s'])})"
        return f"{t(r['step_time_s'])} ({t(r['step_time_decode_floor_s'])})"

    for student in STUDENTS:
        for target in TARGETS:
            r = rows.get(f"{student}/{target}")
            if not r or r.get("status") != "done":
                why = "not computed" if not r or r.get("status") == "running" else \
                    f"not computed ({r.get('error', 'failed')[:80]})"
                lines.append(f"| {student} | {target} | {why} |" + " |" * 7)
                continue
            mb = "none" if r["micro_batch_size"] is None else str(r["micro_batch_size"])
            sl = "none" if r["num_slots"] is None else f"{r['num_slots']} ({r['slots_per_device']})"
            method = "compiled" if r["method"] == "compiled" else "**estimate**"
            if r.get("host_memory_limited"):
                method += " (probes beyond this host's memory: " + ", ".join(
                    p.split(":")[0] + " at " + ("micro-batch " + p.split(":")[1] if p.startswith("update")
                                                else p.split(":")[2] + " slots")
                    for p in r["host_memory_limited"]) + ")"
            lines.append(f"| {student} | {target} | {method} | {'yes' if r['fits'] else 'no'} | {mb} | "
                         f"{g(r['resident_update_gib'])} | {sl} | {g(r['resident_rollout_gib'])} | "
                         f"{g(r['chip_gib'])} | {times(r)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "plan_table.json"), help="the JSON file of rows (resumed)")
    p.add_argument("--rows", default="", help="comma-separated student/target keys to plan (default: all)")
    p.add_argument("--search-seconds", type=float, default=2400.0, help="per knob: no new probe after this")
    p.add_argument("--start-slots", type=int, default=32, help="rollout.num_slots to start each search from")
    p.add_argument("--host-memory-gb", type=float, default=12.0, help="heap cap of each compiling child process")
    p.add_argument("--markdown", action="store_true", help="print the table from the file and exit")
    p.add_argument("--students", default="", help="NAME=CONFIG,... instead of the paper's two students")
    p.add_argument("--targets", default="", help="comma-separated targets instead of the paper's five")
    args = p.parse_args()
    if args.students:
        STUDENTS.clear()
        STUDENTS.update(dict(item.split("=", 1) for item in args.students.split(",")))
    if args.targets:
        TARGETS[:] = args.targets.split(",")
    out = Path(args.out)
    rows = load(out)
    if args.markdown:
        print(markdown(rows))
        return 0
    wanted = [k for k in args.rows.split(",") if k] or [f"{s}/{t}" for s in STUDENTS for t in TARGETS]
    for key in wanted:
        if rows.get(key, {}).get("status") == "done":
            print(f"{key}: done before, kept", flush=True)
            continue
        print(f"{key}: planning ...", flush=True)
        t0 = time.time()
        try:
            if "x" in key.split("/")[1].lower() and key.split("/")[1].split("x")[0].isdigit():
                estimate_row(key, rows, out, args)
            else:
                Row(key, rows, out, args).run()
            for stale in ("error", "trace"):  # a row that failed before and is done now
                rows[key].pop(stale, None)
            save(out, rows)
        except Exception as e:  # noqa: BLE001 - a failed row keeps its probes and is retried by the next run
            rows.setdefault(key, {}).update(status="error", error=f"{type(e).__name__}: {e}",
                                            trace=traceback.format_exc()[-4000:])
            save(out, rows)
        r = rows[key]
        print(f"{key}: {r['status']} in {time.time() - t0:.0f} s: micro-batch {r.get('micro_batch_size')}, "
              f"slots {r.get('num_slots')} {r.get('error', '')}", flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
