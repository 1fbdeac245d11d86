"""Code answers with LiveCodeBench semantics: the program is run on the problem's test cases in the
sandbox.

* The code is the last fenced python block of the text after the last ``</think>`` (the reference
  takes the text between the first and second ``</think>``, which misses answers after later thinking;
  we take the final answer). No block, or code that does not parse: score -1.
* Ground truth: ``{"inputs": [...], "outputs": [...], "fn_name": optional}`` or its JSON string.
* stdin/stdout cases (no ``fn_name``): one sandbox run per case, the input on stdin; the case passes
  when the run finishes with exit code 0 and its stdout, trailing newlines stripped, equals the
  expected output, trailing newlines stripped.
* functional cases (``fn_name``): ``fn_name`` is a function of the program or a method of
  ``class Solution``; each case's input holds one JSON argument per line; the result is printed as
  JSON and passes when it equals the expected output as text (trailing newlines stripped) or as JSON
  (so ``[1,2]`` and ``[1, 2]`` agree). All cases of one answer run in one sandbox process under a
  per-case timer (a case that outlives it fails; the run as a whole is bounded by the sandbox).
* Test data is never readable by the solution: inputs arrive on stdin, expected outputs never leave
  this process.
* score = fraction of cases passed (no pass: 0.0), acc = all passed, pred = the code.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from typing import Any, Optional

from sod_jax.sandbox.protocol import run_request

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
RESULT_MARK = "@@sod-case@@ "  # prefix of the harness's per-case result lines


def extract_code(solution: str) -> Optional[str]:
    """The last fenced python block after the last ``</think>`` (the whole text if there is none)."""
    tail = solution.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(tail)
    return blocks[-1] if blocks else None


def parse_ground_truth(ground_truth: Any) -> dict:
    """``{"inputs", "outputs", "fn_name"}`` from a mapping or its JSON string; ValueError otherwise."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not isinstance(gt, dict) or not isinstance(gt.get("inputs"), list) or not isinstance(gt.get("outputs"), list):
        raise ValueError("code ground truth must be a mapping with lists 'inputs' and 'outputs'")
    if len(gt["inputs"]) != len(gt["outputs"]):
        raise ValueError(f"code ground truth has {len(gt['inputs'])} inputs but {len(gt['outputs'])} outputs")
    return {"inputs": [str(x) for x in gt["inputs"]], "outputs": [str(x) for x in gt["outputs"]],
            "fn_name": gt.get("fn_name") or None}


_HARNESS = '''\
import io as _io, json as _json, signal as _signal, sys as _sys
_SRC = {src!r}
_FN = {fn!r}
_CASE_TIMEOUT = {case_timeout!r}
_MARK = {mark!r}


class _CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _CaseTimeout()


def _report(i, ok, out="", err=""):
    _OUT.write(_MARK + _json.dumps({{"case": i, "ok": ok, "out": out, "err": err[:300]}}) + "\\n")
    _OUT.flush()


_OUT = _sys.stdout
_cases = _json.loads(_sys.stdin.read())
_sys.stdin = _io.StringIO("")
_sys.stdout = _io.StringIO()  # what the solution prints is not its answer
_ns = {{"__name__": "solution", "__builtins__": __builtins__}}
_target = None
try:
    exec(compile(_SRC, "solution.py", "exec"), _ns)
    _cls = _ns.get("Solution")
    if isinstance(_cls, type) and hasattr(_cls, _FN):
        _target = getattr(_cls(), _FN)
    elif callable(_ns.get(_FN)):
        _target = _ns[_FN]
    _load_err = "" if _target else f"no function or Solution method named {{_FN!r}}"
except BaseException as e:
    _load_err = f"{{type(e).__name__}}: {{e}}"
_signal.signal(_signal.SIGALRM, _alarm)
for _i, _case in enumerate(_cases):
    if _target is None:
        _report(_i, False, err=_load_err)
        continue
    try:
        _args = [_json.loads(_line) for _line in _case.split("\\n") if _line.strip()]
        _sys.stdout = _io.StringIO()
        _signal.setitimer(_signal.ITIMER_REAL, _CASE_TIMEOUT)
        try:
            _res = _target(*_args)
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        _report(_i, True, _json.dumps(_res))
    except _CaseTimeout:
        _report(_i, False, err="case time limit exceeded")
    except BaseException as e:
        _report(_i, False, err=f"{{type(e).__name__}}: {{e}}")
'''


def functional_program(code: str, fn_name: str, case_timeout: float) -> str:
    """The harness that defines the solution in its own namespace and calls ``fn_name`` once per case
    (cases as a JSON list of input strings on stdin), reporting each result on a marked line."""
    return _HARNESS.format(src=code, fn=fn_name, case_timeout=float(case_timeout), mark=RESULT_MARK)


def _same(out: str, expected: str) -> bool:
    a, b = out.rstrip("\n"), expected.rstrip("\n")
    if a == b:
        return True
    try:
        return json.loads(a) == json.loads(b)
    except (ValueError, TypeError):
        return False


def _finished_ok(resp: dict) -> bool:
    rr = resp.get("run_result") or {}
    return resp.get("status") != "SandboxError" and rr.get("status") == "Finished" and rr.get("return_code") == 0


async def _stdin_cases(sandbox, code: str, gt: dict, case_timeout: float, memory_mb: int) -> list[bool]:
    async def one(inp: str, expected: str) -> bool:
        resp = await sandbox.run(run_request(code, stdin=inp, run_timeout=case_timeout, memory_limit_mb=memory_mb))
        return _finished_ok(resp) and resp["run_result"]["stdout"].rstrip("\n") == expected.rstrip("\n")

    return list(await asyncio.gather(*(one(i, o) for i, o in zip(gt["inputs"], gt["outputs"]))))


async def _functional_cases(sandbox, code: str, gt: dict, case_timeout: float, memory_mb: int) -> list[bool]:
    n = len(gt["inputs"])
    program = functional_program(code, gt["fn_name"], case_timeout)
    resp = await sandbox.run(run_request(program, stdin=json.dumps(gt["inputs"]), run_timeout=case_timeout * n + 5,
                                         memory_limit_mb=memory_mb))
    passed = [False] * n
    stdout = (resp.get("run_result") or {}).get("stdout") or ""
    for line in stdout.split("\n"):
        if not line.startswith(RESULT_MARK):
            continue
        try:
            rec = json.loads(line[len(RESULT_MARK):])
            i = int(rec["case"])
        except (ValueError, KeyError, TypeError):
            continue
        if 0 <= i < n and rec.get("ok") and isinstance(rec.get("out"), str):
            passed[i] = _same(rec["out"], gt["outputs"][i])
    return passed


async def score_code(solution: str, ground_truth: Any, sandbox, *, case_timeout: float = 6.0,
                     memory_limit_mb: int = 1024) -> dict:
    """LiveCodeBench-style score of ``solution`` (see the module docstring); ``sandbox`` implements the
    sandbox protocol (``LocalSandbox`` / ``FusionSandbox``)."""
    code = extract_code(solution)
    if code is None:
        return {"score": -1.0, "acc": False, "pred": ""}
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return {"score": -1.0, "acc": False, "pred": code}
    gt = parse_ground_truth(ground_truth)
    if not gt["inputs"]:
        return {"score": 0.0, "acc": False, "pred": code}
    run = _functional_cases if gt["fn_name"] else _stdin_cases
    passed = await run(sandbox, code, gt, case_timeout, memory_limit_mb)
    frac = sum(passed) / len(passed)
    return {"score": float(frac), "acc": all(passed), "pred": code}
