"""Tool-code handling: fenced blocks, the last expression printed (decided with ast), truncation."""

import pytest

from sod_jax.rollout.tools import (
    call_problem,
    extract_code,
    prepare_code,
    print_last_expression,
    reference_call,
    tool_text,
    truncate,
)


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


def reference_truncate(text, max_len=256):
    """verl's tool agent loop (middle truncation), written out as it reads there."""
    if text and len(text) > max_len:
        length = max_len // 2
        text = text[:length] + "...(truncated)..." + text[-length:]
    return text


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000])
def test_truncation_is_the_references_rule(n):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(n))
    assert truncate(text) == truncate(text, 256) == reference_truncate(text)
    if n > 256:
        assert truncate(text) == text[:128] + "...(truncated)..." + text[-128:]
        assert len(truncate(text)) == 256 + len("...(truncated)...")
    else:
        assert truncate(text) == text


def test_truncation_head_and_tail_are_configurable():
    text = "".join(str(i % 10) for i in range(1000))
    assert truncate(text, 256, head=200, tail=20) == text[:200] + "...(truncated)..." + text[-20:]
    assert truncate(text, 256, head=10, tail=0) == text[:10] + "...(truncated)..."
    assert truncate(text, 512) == reference_truncate(text, 512)


FINISHED_ERR = {"status": "Failed", "run_result": {"status": "Finished", "return_code": 1, "stdout": "a\n",
                                                   "stderr": "Traceback...\nZeroDivisionError"}}
TLE = {"status": "Failed", "run_result": {"status": "TimeLimitExceeded", "stdout": "part", "stderr": ""}}
RUN_ERROR = {"status": "Failed", "run_result": {"status": "Error", "stdout": "", "stderr": ""}}
DOWN = {"status": "SandboxError", "message": "server down", "run_result": None}


def test_tool_text_reference():
    # A finished run shows stdout + stderr whatever its exit code; anything else is "no stdout here".
    assert tool_text(FINISHED_ERR) == "a\nTraceback...\nZeroDivisionError"
    for r in (TLE, RUN_ERROR, DOWN):
        assert tool_text(r) == tool_text(r, 256, "reference") == "no stdout here"
    long = {"status": "Success", "run_result": {"status": "Finished", "stdout": "x" * 300 + "y" * 300, "stderr": ""}}
    assert tool_text(long) == "x" * 128 + "...(truncated)..." + "y" * 128


def test_tool_text_descriptive():
    assert tool_text(FINISHED_ERR, 256, "descriptive") == "a\nTraceback...\nZeroDivisionError"
    assert tool_text(TLE, 256, "descriptive") == "part\nError: execution timed out."
    assert tool_text(RUN_ERROR, 256, "descriptive") == "Error: execution failed."
    assert tool_text(DOWN, 256, "descriptive") == "Tool execution failed: server down"
    with pytest.raises(ValueError, match="unknown failure_text 'loud'"):
        tool_text(DOWN, 256, "loud")


@pytest.mark.parametrize("name,arguments,expected", [
    ("code_interpreter", {"code": "print(1)"}, ("print(1)", None)),
    ("code_interpreter", {"src": "1"}, ("", None)),  # the reference runs .get("code", "")
    ("code_interpreter", {"code": 12}, ("12", None)),  # ... and str() of a non-string code
    ("bash", {"code": "ls"}, (None, "Error when executing tool: 'bash'")),
    ("", {"code": "ls"}, (None, "Error when executing tool: ''")),
    ("code_interpreter", "print(1)", (None, "Error when executing tool: 'str' object has no attribute 'get'")),
    ("code_interpreter", None, (None, "Error when executing tool: 'NoneType' object has no attribute 'get'")),
])
def test_reference_call(name, arguments, expected):
    assert reference_call(name, arguments, "code_interpreter") == expected


def reference_call_tool(tools, name, arguments):
    """The reference's lookup and argument read, run for real (the exception text is what the model reads)."""
    try:
        tool = tools[name]
        code = arguments.get("code", "")
        return (code if isinstance(code, str) else str(code)), tool
    except Exception as e:  # noqa: BLE001 - the reference catches everything here
        return f"Error when executing tool: {e}", None


@pytest.mark.parametrize("name,arguments", [("python", {}), ("code_interpreter", [1]), ("code_interpreter", 3.5),
                                            ("x y", {"code": True})])
def test_reference_call_texts_equal_python_exceptions(name, arguments):
    got_code, got_err = reference_call(name, arguments, "code_interpreter")
    text, tool = reference_call_tool({"code_interpreter": object()}, name, arguments)
    assert (got_err if got_code is None else got_code) == text


def test_call_problems():
    assert call_problem("code_interpreter", {"code": "1"}, "code_interpreter") is None
    assert "unknown tool 'python'" in call_problem("python", {"code": "1"}, "code_interpreter")
    assert "no \"code\"" in call_problem("code_interpreter", {"src": "1"}, "code_interpreter")
