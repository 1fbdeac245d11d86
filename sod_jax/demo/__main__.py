"""``python -m sod_jax.demo``: the CPU demo's data, tokenizer, models and the SOD/OPD/GRPO comparison.

The package ships everything the demo needs (``sod_jax/demo/assets``: parquet splits, tokenizer,
teacher, student); these commands rebuild them (the models come from ``python -m sod_jax.sft --config
configs/demo_teacher_sft.yaml``: SFT stopped by held-out tool-using accuracy):

    python -m sod_jax.demo data --out DIR              # train / held-out splits + expert SFT rows
    python -m sod_jax.demo tokenizer --sft FILE --out DIR
    python -m sod_jax.demo check-data --out DIR        # the demo_check task: splits, clean, error-and-redo, redo-only rows
    python -m sod_jax.demo probe --student DIR --teacher DIR   # the mechanism probe, before any RL
    python -m sod_jax.demo recovery EVAL_DIR           # accuracy, recovery after a failed check, op slips
    python -m sod_jax.demo compare run --seeds 0,1,2 --out runs/demo_pilot          # the pilot
    python -m sod_jax.demo compare plan --pilot-dir runs/demo_pilot --min-effect 0.04 --out runs/demo_compare
    python -m sod_jax.demo compare run --rule runs/demo_compare/rule.json --out runs/demo_compare
    python -m sod_jax.demo compare table --out runs/demo_compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write train/held-out parquet splits and expert SFT rows (real sandbox)")
    d.add_argument("--out", default=str(ASSETS / "data"), help="output directory")
    d.add_argument("--n-train", type=int, default=4000, help="RL train prompts")
    d.add_argument("--n-heldout", type=int, default=256, help="held-out prompts")
    d.add_argument("--n-sft", type=int, default=4000, help="expert trajectories (from the first train prompts)")
    d.add_argument("--seed", type=int, default=0, help="train seed (held-out uses seed + 1)")
    t = sub.add_parser("tokenizer", help="train the demo BPE on the rendered expert trajectories")
    t.add_argument("--sft", default=str(ASSETS / "data" / "sft_train.parquet"), help="expert SFT parquet")
    t.add_argument("--out", default=str(ASSETS / "tokenizer"), help="output directory")
    t.add_argument("--vocab-size", type=int, default=512, help="vocabulary size (added tokens included)")
    k = sub.add_parser("check-data", help="write the demo_check task's splits and its clean (teacher), "
                       "error-and-redo (student) and redo-only (the student's second stage) expert SFT rows "
                       "(real sandbox)")
    k.add_argument("--out", default=str(ASSETS / "check" / "data"), help="output directory")
    k.add_argument("--n-train", type=int, default=4000, help="RL train prompts")
    k.add_argument("--n-heldout", type=int, default=512, help="held-out prompts")
    k.add_argument("--n-sft", type=int, default=4000, help="expert trajectories per set (from the first train prompts)")
    k.add_argument("--recover-fraction", type=float, default=0.5,
                   help="share of the student's rows with one miscopied step and its redo")
    k.add_argument("--seed", type=int, default=0, help="train seed (held-out uses seed + 1)")
    pr = sub.add_parser("probe", help="the mechanism probe on a teacher/student pair (demo_check), before any RL: "
                        "P(redo) after a failed check, OPD's push on the redo, d_k / w_k, the post-error term's "
                        "effect on log pi(redo)")
    pr.add_argument("--student", default=str(ASSETS / "check" / "student"), help="student HF checkpoint directory")
    pr.add_argument("--teacher", default=str(ASSETS / "check" / "teacher"), help="teacher HF checkpoint directory")
    pr.add_argument("--heldout", default=str(ASSETS / "check" / "data" / "heldout.parquet"),
                    help="held-out demo_check parquet (its first --n problems are used)")
    pr.add_argument("--n", type=int, default=128, help="trajectories (one per held-out problem)")
    pr.add_argument("--seed", type=int, default=0, help="draws the error step and the miscopied digit")
    pr.add_argument("--no-gradients", action="store_true", help="skip the gradient figures")
    pr.add_argument("--json", default=None, help="also write the figures to this JSON file")
    rc = sub.add_parser("recovery", help="accuracy, the rate of a successful redo after a failed check and the "
                        "share of restated rules with a wrong op, read from a python -m sod_jax.eval output "
                        "directory of demo_check prompts")
    rc.add_argument("eval_dir", help="the eval's eval.out_dir (generations.jsonl)")
    rc.add_argument("--heldout", default=str(ASSETS / "check" / "data" / "heldout.parquet"),
                    help="the parquet the eval ran on (prompt_id = row position)")
    c = sub.add_parser("compare", help="SOD / OPD / GRPO / control OPD from the demo student, decided by a rule "
                       "fixed before the runs (plan), run resumably (run), tabulated from the files (table)")
    cs = c.add_subparsers(dest="action", required=True)
    cp = cs.add_parser("plan", help="write rule.json / rule.md from a pilot before the main runs")
    cp.add_argument("--pilot-dir", required=True, help="the pilot: <arm>/seed<k> runs of sod, opd and grpo")
    cp.add_argument("--min-effect", type=float, required=True, help="minimum effect of interest (held-out accuracy)")
    cp.add_argument("--out", required=True, help="where rule.json, rule.md and later the main runs go")
    cp.add_argument("--seeds", default=None, help="the fixed seed list (default: the needed number after the pilot's)")
    cp.add_argument("--first-seed", type=int, default=None, help="first seed of the default list")
    cp.add_argument("--at-least", type=int, default=6, help="fewest paired seeds")
    cp.add_argument("--at-most", type=int, default=64, help="most paired seeds (the rule says when it binds)")
    cp.add_argument("--eval-n", type=int, default=4, help="samples per held-out prompt in the final evaluation")
    cp.add_argument("--heldout", default="sod_jax/demo/assets/check/data/heldout.parquet",
                    help="held-out parquet (>= 256; default: the 512 demo_check prompts)")
    cp.add_argument("--bootstrap-reps", type=int, default=10000, help="bootstrap replicates")
    cp.add_argument("--config", default=None,
                    help="base RL config (default: the pilot's, else configs/demo.yaml)")
    cp.add_argument("--force", action="store_true", help="replace an existing rule.json")
    cp.add_argument("overrides", nargs="*", help="key=value overrides of every run (default: the pilot's)")
    cr = cs.add_parser("run", help="train, export and evaluate every arm x seed; complete runs are skipped")
    cr.add_argument("--rule", default=None, help="rule.json of compare plan (fixes seeds and settings)")
    cr.add_argument("--out", required=True, help="where the runs, table and plot go")
    cr.add_argument("--arms", default=None, help="comma-separated arms of grpo,opd,sod,opd_control "
                    "(default: all four with --rule, sod,opd,grpo without)")
    cr.add_argument("--seeds", default=None, help="without --rule (a pilot): comma-separated seeds, e.g. 0,1,2")
    cr.add_argument("--config", default=None, help="without --rule: base RL config (default configs/demo.yaml)")
    cr.add_argument("--eval-n", type=int, default=None, help="without --rule: samples per held-out prompt (default 4)")
    cr.add_argument("--heldout", default=None, help="without --rule: held-out parquet")
    cr.add_argument("overrides", nargs="*", help="key=value overrides passed to every run (recorded per run)")
    ct = cs.add_parser("table", help="rebuild compare.md / compare.json / compare_acc.png / compare_weights.png "
                                     "from the run files")
    ct.add_argument("--out", required=True, help="the comparison directory")
    return p


def restated_ops(eval_dir: Path, prompts: dict) -> dict:
    """Restated rules with a wrong op (:func:`sod_jax.demo.check_task.restated_op_slips`) over an
    eval's samples: their count and rate over all samples, and the rate in the correct samples
    without a tool error (whose checks all passed)."""
    from sod_jax.demo.check_task import restated_op_slips
    from sod_jax.tracking import read_jsonl

    tot = [0, 0]
    clean = [0, 0]
    for r in read_jsonl(eval_dir / "generations.jsonl"):
        res = restated_op_slips(prompts.get(r["prompt_id"], ""), r.get("response") or "")
        if res is None:
            continue
        tot = [tot[0] + res[0], tot[1] + res[1]]
        if r.get("acc") and not r.get("tool_errors"):
            clean = [clean[0] + res[0], clean[1] + res[1]]
    rate = lambda c: c[1] / c[0] if c[0] else None  # noqa: E731
    return {"restated_rules": tot[0], "restated_op_wrong": rate(tot), "restated_op_wrong_clean": rate(clean)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "data":
        from sod_jax.demo.task import write_dataset

        paths = write_dataset(Path(args.out), args.n_train, args.n_heldout, args.n_sft, args.seed)
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return 0
    if args.cmd == "tokenizer":
        from sod_jax.data import load_rows
        from sod_jax.demo.tokenizer import corpus_from_rows, train_tokenizer

        rows, _ = load_rows([args.sft], "sft")
        out = train_tokenizer(corpus_from_rows(rows), Path(args.out), args.vocab_size)
        print(out)
        return 0
    if args.cmd == "check-data":
        from sod_jax.demo.check_task import write_dataset as write_check

        paths = write_check(Path(args.out), args.n_train, args.n_heldout, args.n_sft, args.seed,
                            recover_fraction=args.recover_fraction)
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return 0
    if args.cmd == "probe":
        from sod_jax.demo.probe import format_probe, run_probe

        res = run_probe(args.student, args.teacher, args.heldout, n=args.n, seed=args.seed,
                        gradients=not args.no_gradients)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        print(format_probe(res))
        return 0
    if args.cmd == "recovery":
        from sod_jax.demo.compare import heldout_prompts, read_eval

        res = read_eval(Path(args.eval_dir), heldout_prompts(args.heldout))
        if res is None:
            print(f"error: {args.eval_dir}/generations.jsonl is missing or empty: run python -m sod_jax.eval "
                  "with eval.out_dir there first", file=sys.stderr)
            return 2
        rec = res["recovery"] or {}
        print(json.dumps({"samples": res["samples"], "prompts": len(res["per_prompt"]), "acc": res["acc"],
                          "length_finishes": res["length_finishes"], "failed_check": rec.get("errors"),
                          "recovered": rec.get("recovered"), "recovery_rate": rec.get("rate"),
                          **restated_ops(Path(args.eval_dir), heldout_prompts(args.heldout))}))
        return 0
    if args.cmd == "compare":
        from sod_jax.demo.compare import run_compare

        return run_compare(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
