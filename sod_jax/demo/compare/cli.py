"""The CLI of the comparison: ``python -m sod_jax.demo compare {plan,run,table}`` (the parser is in
``sod_jax.demo.__main__``; what each step does: :mod:`sod_jax.demo.compare`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sod_jax.demo.compare.report import write_report
from sod_jax.demo.compare.rule import RULE_JSON, RULE_MD, make_rule, rule_markdown, write_rule
from sod_jax.demo.compare.runs import ARMS, DEFAULT_CONFIG, DEFAULT_HELDOUT, PILOT_ARMS, run_arms


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_plan(args: Any) -> int:
    try:
        rule = make_rule(Path(args.pilot_dir), args.min_effect, config=args.config,
                         overrides=args.overrides or None, heldout=args.heldout, eval_n=args.eval_n,
                         seeds=_ints(args.seeds) if args.seeds else None, first_seed=args.first_seed,
                         at_least=args.at_least, at_most=args.at_most, bootstrap_reps=args.bootstrap_reps)
        path = write_rule(Path(args.out), rule, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rule_markdown(rule))
    print(f"rule: {path} (and {Path(args.out) / RULE_MD}); next: python -m sod_jax.demo compare run --rule {path} "
          f"--out {args.out}")
    return 0


def cmd_run(args: Any) -> int:
    out = Path(args.out)
    if args.rule:
        rule = json.loads(Path(args.rule).read_text())
        if args.seeds or args.config or args.eval_n is not None or args.heldout:
            print("error: with --rule the rule fixes the seeds, config, held-out set and eval.n; drop --seeds / "
                  "--config / --eval-n / --heldout", file=sys.stderr)
            return 2
        rule_file = out / RULE_JSON
        if not rule_file.is_file():
            out.mkdir(parents=True, exist_ok=True)
            rule_file.write_text(Path(args.rule).read_text())
            if Path(args.rule).with_name(RULE_MD).is_file():
                (out / RULE_MD).write_text(Path(args.rule).with_name(RULE_MD).read_text())
        elif json.loads(rule_file.read_text()) != rule:
            print(f"error: {rule_file} differs from {args.rule}: one --out holds one rule", file=sys.stderr)
            return 2
        if args.overrides:
            print(f"warning: overrides beyond the rule's ({' '.join(args.overrides)}) change the pre-registered "
                  "runs; each run's compare_run.json records them", file=sys.stderr)
        seeds, coef = list(rule["seeds"]), rule["opd_control_coef"]
        settings = {"config": rule["config"], "overrides": [*rule["overrides"], *args.overrides],
                    "heldout": rule["heldout"], "eval_n": rule["eval_n"]}
        arms = [a.strip() for a in (args.arms or ",".join(ARMS)).split(",") if a.strip()]
    else:
        if not args.seeds:
            print("error: give --rule RULE.json (the main runs) or --seeds (a pilot without a rule)", file=sys.stderr)
            return 2
        seeds, coef = _ints(args.seeds), None
        arms = [a.strip() for a in (args.arms or ",".join(PILOT_ARMS)).split(",") if a.strip()]
        if "opd_control" in arms:
            print("error: the opd_control arm needs the rule's coefficient: run compare plan first, then --rule",
                  file=sys.stderr)
            return 2
        settings = {"config": args.config or DEFAULT_CONFIG, "overrides": list(args.overrides),
                    "heldout": args.heldout or DEFAULT_HELDOUT, "eval_n": 4 if args.eval_n is None else args.eval_n}
    bad = [a for a in arms if a not in ARMS]
    if bad:
        print(f"error: unknown arm(s) {', '.join(bad)}; known: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    rc = run_arms(out, arms, seeds, control_coef=coef, **settings)
    if rc == 0:
        paths = write_report(out)
        print(f"table: {paths['md']}; plots: {_plots(paths)}")
    return rc


def _plots(paths: dict) -> str:
    return ", ".join(str(p) for p in (paths["png"], paths["weights_png"]) if p is not None)


def cmd_table(args: Any) -> int:
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a directory", file=sys.stderr)
        return 2
    paths = write_report(out)
    print(paths["md"].read_text())
    print(f"table: {paths['md']}; data: {paths['json']}; plots: {_plots(paths)}")
    return 0


def run_compare(args: Any) -> int:
    """``python -m sod_jax.demo compare {plan,run,table}`` (the parser is in ``sod_jax.demo.__main__``)."""
    return {"plan": cmd_plan, "run": cmd_run, "table": cmd_table}[args.action](args)
