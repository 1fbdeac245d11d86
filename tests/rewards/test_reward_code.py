"""The code reward through the real local sandbox: stdin and functional cases, timeouts, wrong
answers, crashes, and a solution that hunts for the tests."""

from __future__ import annotations

import asyncio
import json

import pytest

from sod_jax.rewards import extract_code, score_code
from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

STDIN_GT = {"inputs": ["1 2\n", "3 4\n", "10 -5\n"], "outputs": ["3\n", "7\n", "5\n"]}
FN_GT = {"inputs": ["[2, 7, 11, 15]\n9", "[3, 2, 4]\n6"], "outputs": ["[0, 1]", "[1,2]"], "fn_name": "twoSum"}


def answer(code: str, think: str = "<think>\nplan\n</think>\n\n") -> str:
    return f"{think}Here it is:\n```python\n{code}\n```"


@pytest.fixture(scope="module")
def sandbox():
    return LocalSandbox(LocalSandboxConfig(workers=4))


def score(sandbox, solution, gt, case_timeout=3.0):
    return asyncio.run(score_code(solution, gt, sandbox, case_timeout=case_timeout))


def test_extraction():
    assert extract_code("```python\na\n```\n```python\nb\n```") == "b\n"
    # after the LAST </think>: a block inside earlier thinking does not count
    assert extract_code("<think>```python\nx\n```</think>no code") is None
    assert extract_code("<think>a</think>```python\nx\n```<think>b</think>```py\ny\n```") == "y\n"
    assert extract_code("```\nunlabelled\n```") is None


def test_stdin_cases(sandbox):
    good = answer("a, b = map(int, input().split())\nprint(a + b)")
    assert score(sandbox, good, STDIN_GT) == {"score": 1.0, "acc": True,
                                              "pred": "a, b = map(int, input().split())\nprint(a + b)\n"}
    assert score(sandbox, good, json.dumps(STDIN_GT))["score"] == 1.0  # JSON-string ground truth
    trailing = answer("a, b = map(int, input().split())\nprint(a + b)\nprint()\nprint()")
    assert score(sandbox, trailing, STDIN_GT)["score"] == 1.0  # trailing newlines stripped
    spaced = answer("a, b = map(int, input().split())\nprint(a + b, end=' ')")
    assert score(sandbox, spaced, STDIN_GT)["score"] == 0.0  # only newlines are stripped
    wrong = answer("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)")
    out = score(sandbox, wrong, STDIN_GT)
    assert out["score"] == pytest.approx(2 / 3) and not out["acc"]


def test_stdin_timeout_crash_and_no_code(sandbox):
    slow = answer("a, b = map(int, input().split())\nif a == 3:\n    while True: pass\nprint(a + b)")
    assert score(sandbox, slow, STDIN_GT, case_timeout=1.0)["score"] == pytest.approx(2 / 3)
    crash = answer("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)")
    assert score(sandbox, crash, STDIN_GT)["score"] == 0.0  # right output, non-zero exit
    assert score(sandbox, "no code at all", STDIN_GT) == {"score": -1.0, "acc": False, "pred": ""}
    bad = score(sandbox, answer("def f(:\n  pass"), STDIN_GT)
    assert bad["score"] == -1.0 and bad["pred"] == "def f(:\n  pass\n"


def test_functional_cases(sandbox):
    method = answer("class Solution:\n    def twoSum(self, nums, target):\n"
                    "        seen = {}\n        for i, x in enumerate(nums):\n"
                    "            if target - x in seen:\n                return [seen[target - x], i]\n"
                    "            seen[x] = i\n")
    assert score(sandbox, method, FN_GT)["score"] == 1.0  # "[1,2]" and "[1, 2]" agree as JSON
    function = answer("def twoSum(nums, target):\n    print('noise')\n    for i in range(len(nums)):\n"
                      "        for j in range(i):\n            if nums[i] + nums[j] == target:\n"
                      "                return [j, i]")
    assert score(sandbox, function, FN_GT)["score"] == 1.0  # prints inside the call are not the answer
    half = answer("def twoSum(nums, target):\n    return [0, 1]")
    assert score(sandbox, half, FN_GT) == {"score": 0.5, "acc": False, "pred": "def twoSum(nums, target):\n    return [0, 1]\n"}
    missing = answer("def other(nums, target):\n    return [0, 1]")
    assert score(sandbox, missing, FN_GT)["score"] == 0.0


def test_functional_timeout_and_crash(sandbox):
    hang = answer("def twoSum(nums, target):\n    if target == 6:\n        while True: pass\n    return [0, 1]")
    assert score(sandbox, hang, FN_GT, case_timeout=1.0)["score"] == 0.5  # the hanging case fails alone
    boom = answer("def twoSum(nums, target):\n    if target == 9:\n        raise RuntimeError('x')\n"
                  "    return [1, 2]")
    assert score(sandbox, boom, FN_GT)["score"] == 0.5
    exits = answer("import sys\ndef twoSum(nums, target):\n    sys.exit(0)")
    assert score(sandbox, exits, FN_GT)["score"] == 0.0
    at_import = answer("raise ImportError('nope')\ndef twoSum(nums, target):\n    return [0, 1]")
    assert score(sandbox, at_import, FN_GT)["score"] == 0.0


HUNTER = r'''
import gc, glob, os, sys
found = []
for pattern in ("/tmp/**/*", "./**/*", "/proc/self/cwd/**/*", os.path.expanduser("~") + "/**/*"):
    for p in glob.glob(pattern, recursive=True):
        try:
            found.append(open(p, errors="ignore").read())
        except Exception:
            pass
main = sys.modules.get("__main__")
found.append(repr(vars(main)) if main else "")
found += [repr(o) for o in gc.get_objects() if isinstance(o, (list, dict))][:20000]
blob = "\n".join(found)
'''


def test_solution_cannot_read_the_tests(sandbox):
    # secret expected outputs: any hunter that found them could print them
    gt = {"inputs": ["0\n", "1\n"], "outputs": ["SECRET-73915\n", "SECRET-28460\n"]}
    hunter = answer(HUNTER + "import re\nk = int(input())\nm = re.findall(r'SECRET-\\d+', blob)\n"
                    "print(m[k] if len(m) > k else 'not found')")
    out = score(sandbox, hunter, gt, case_timeout=5.0)
    assert out["score"] == 0.0
    fgt = {"inputs": ["0", "1"], "outputs": ['"SECRET-73915"', '"SECRET-28460"'], "fn_name": "f"}
    fhunter = answer(HUNTER + "import re\ndef f(k):\n    m = re.findall(r'SECRET-\\d+', blob + repr(sys._getframe(1).f_globals))\n"
                     "    return m[k] if len(m) > k else 'not found'")
    assert score(sandbox, fhunter, fgt, case_timeout=5.0)["score"] == 0.0
