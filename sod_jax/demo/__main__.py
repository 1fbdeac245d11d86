"""``python -m sod_jax.demo``: the CPU demo's data, tokenizer, models and the SOD/OPD/GRPO comparison.

The package ships everything the demo needs (``sod_jax/demo/assets``: parquet splits, tokenizer,
teacher, student); these commands rebuild them (the models come from ``python -m sod_jax.sft --config
configs/demo_teacher_sft.yaml``: SFT stopped by held-out tool-using accuracy):

    python -m sod_jax.demo data --out DIR              # train / held-out splits + expert SFT rows
    python -m sod_jax.demo tokenizer --sft FILE --out DIR
    python -m sod_jax.demo compare --algos sod,opd,grpo --seeds 3
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
    c = sub.add_parser("compare", help="run SOD / OPD / GRPO from the demo student (same budget), tabulate, plot")
    c.add_argument("--algos", default="sod,opd,grpo", help="comma-separated algo.name values")
    c.add_argument("--seeds", type=int, default=3, help="seeds per algorithm")
    c.add_argument("--config", default="configs/demo.yaml", help="the base RL config")
    c.add_argument("--out", default="runs/demo_compare", help="where the runs, table and plot go")
    c.add_argument("--reuse", action="store_true", help="skip runs whose eval.jsonl is complete")
    c.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    return p


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
    if args.cmd == "compare":
        from sod_jax.demo.compare import run_compare

        return run_compare(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
