"""Tool-code handling: fenced blocks, the last expression printed (decided with ast), truncation."""

import pytest

from sod_jax.rollout.tools import (TRUNCATION_MARKER, call_problem, extract_code, prepare_code,
                                   print_last_expression, tool_text, truncate)


def test_extract_first_fenced_python_block():
    arg = "Let me try:\n```python\nx = 1\nprint(x)\n```\nand\n```python\ny = 2\n```"
    assert extract_code(arg) == "x = 1\nprint(x)\n"
    assert extract_code("print(3)") == "print(3)"


def run_printed(code):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(print_last_expression(code), "<t>", "exec"), {})
    return buf.getvalue()


@pytest.mark.parametrize("code,out", [
    ("x = 2\nx * 21", "42\n"),
    ("import math\nmath.factorial(5)", "120\n"),
    ("x = [1,\n     2]\nsum(x\n    )", "3\n"),  # multi-line final expression
    ("print('a')", "a\n"),  # print returns None: printed once, not twice
    ("x = 5", ""),  # an assignment prints nothing
    ("for i in range(2):\n    i", ""),  # the last *top-level* statement is a loop
    ("def f():\n    return 7\nf()  # comment", "7\n"),
    ("'a'; 'b'", "b\n"),
])
def test_last_expression_is_printed(code, out):
    assert run_printed(code) == out


def test_unparsable_code_is_left_alone():
    assert print_last_expression("def f(:\n  1") == "def f(:\n  1"
    assert prepare_code("```python\n1 + 1\n```").strip().endswith("print(__sod_value)")


def test_truncate_keeps_head_and_tail():
    text = "".join(str(i % 10) for i in range(1000))
    t = truncate(text, 256)
    assert len(t) == 256 and t.startswith(text[:100]) and t.endswith(text[-100:]) and TRUNCATION_MARKER in t
    assert truncate("short", 256) == "short"


def test_tool_text_of_each_outcome():
    ok = {"status": "Failed", "run_result": {"status": "Finished", "return_code": 1, "stdout": "a\n",
                                             "stderr": "Traceback...\nZeroDivisionError"}}
    assert tool_text(ok, 256) == "a\nTraceback...\nZeroDivisionError"
    tle = {"status": "Failed", "run_result": {"status": "TimeLimitExceeded", "stdout": "", "stderr": ""}}
    assert "timed out" in tool_text(tle, 256)
    err = {"status": "SandboxError", "message": "server down", "run_result": None}
    assert tool_text(err, 256) == "Tool execution failed: server down"


def test_call_problems():
    assert call_problem("code_interpreter", {"code": "1"}, "code_interpreter") is None
    assert "unknown tool 'python'" in call_problem("python", {"code": "1"}, "code_interpreter")
    assert "no \"code\"" in call_problem("code_interpreter", {"src": "1"}, "code_interpreter")
