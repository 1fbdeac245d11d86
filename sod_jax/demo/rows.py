"""What the demo's two tasks (:mod:`sod_jax.demo.task`, :mod:`sod_jax.demo.check_task`) share: seeded
problem sets and splits, the Open-AgentRL RL row, the expert rows' tool call and parquet writing.

Each task passes its own pieces (its ``sample_problem``, its ``data_source``); a problem is anything
with ``text()``, ``answer`` and ``num_steps``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from sod_jax.chat import CODE_INTERPRETER_TOOL

P = TypeVar("P")


def distinct_problems(sample: Callable[[random.Random], P], n: int, seed: int, exclude: Sequence[P] = ()) -> list[P]:
    """``n`` problems drawn by ``sample(random.Random(seed))`` with distinct texts, none equal to one in
    ``exclude``."""
    rng = random.Random(seed)
    seen = {p.text() for p in exclude}
    out = []
    while len(out) < n:
        p = sample(rng)
        t = p.text()
        if t not in seen:
            seen.add(t)
            out.append(p)
    return out


def seeded_splits(sample: Callable[[random.Random], P], n_train: int, n_heldout: int,
                  seed: int = 0) -> tuple[list[P], list[P]]:
    """``(train, heldout)``: held-out from seed ``seed + 1``, train from ``seed`` excluding every
    held-out problem."""
    heldout = distinct_problems(sample, n_heldout, seed + 1)
    return distinct_problems(sample, n_train, seed, exclude=heldout), heldout


def make_rl_row(data_source: str, p: Any, index: int, split: str) -> dict:
    """One Open-AgentRL RL/eval row of problem ``p``."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": p.text()}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(p.answer)},
        "extra_info": {"split": split, "index": index, "num_steps": p.num_steps},
    }


def tool_call(code: str) -> dict:
    """A ``code_interpreter`` call in the OpenAI layout; arguments as a JSON string (renders exactly as
    the chat template's tojson of the dict)."""
    return {"type": "function", "function": {"name": CODE_INTERPRETER_TOOL["function"]["name"],
                                             "arguments": json.dumps({"code": code})}}


def write_parquet(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_rl_splits(out_dir: Path, train: Sequence[Any], heldout: Sequence[Any], n_eval: int,
                    row: Callable[[Any, int, str], dict]) -> dict[str, Path]:
    """``train.parquet``, ``heldout.parquet`` and ``heldout_eval.parquet`` (the RL run's periodic eval
    set: the first ``n_eval`` held-out prompts) under ``out_dir``, one ``row(p, index, split)`` per
    problem; their paths by name."""
    out_dir = Path(out_dir)
    return {"train": write_parquet([row(p, i, "train") for i, p in enumerate(train)], out_dir / "train.parquet"),
            "heldout": write_parquet([row(p, i, "heldout") for i, p in enumerate(heldout)],
                                     out_dir / "heldout.parquet"),
            "heldout_eval": write_parquet([row(p, i, "heldout") for i, p in enumerate(heldout[:n_eval])],
                                          out_dir / "heldout_eval.parquet")}
