"""What the agent does with a ``code_interpreter`` call: pick the code, make the last expression
print, run it, and turn the result into the (truncated) tool text the model sees."""

from __future__ import annotations

import ast
import re
from typing import Optional

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
TRUNCATION_MARKER = "\n...[truncated]...\n"


def extract_code(argument: str) -> str:
    """The first fenced python block of ``argument`` if it has one, else the argument itself."""
    m = _FENCE.search(argument)
    return m.group(1) if m else argument


def print_last_expression(code: str) -> str:
    """If the last top-level statement is an expression, print its value (when not None), as a REPL
    would. Decided with ``ast``; code that does not parse is returned unchanged (the run reports the
    SyntaxError)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    value = ast.get_source_segment(code, last.value)
    if value is None:
        return code
    lines = code.splitlines(keepends=True)
    head = "".join(lines[: last.lineno - 1]) + lines[last.lineno - 1][: last.col_offset]
    tail = "".join(lines[last.end_lineno:]) if last.end_lineno else ""
    return (f"{head}__sod_value = ({value})\nif __sod_value is not None:\n    print(__sod_value)\n{tail}")


def truncate(text: str, limit: int) -> str:
    """Keep at most ``limit`` characters: head and tail around a marker."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(TRUNCATION_MARKER), 2)
    head = keep // 2
    return text[:head] + TRUNCATION_MARKER + text[len(text) - (keep - head):]


def tool_text(response: dict, limit: int) -> str:
    """The observation for a sandbox response: stdout + stderr when the run finished (whatever its
    exit code), a short failure text otherwise."""
    rr = response.get("run_result") or {}
    status = rr.get("status")
    if response.get("status") == "SandboxError" or not rr:
        text = f"Tool execution failed: {response.get('message') or 'sandbox error'}"
    elif status == "TimeLimitExceeded":
        text = (rr.get("stdout") or "") + (rr.get("stderr") or "") + "\nError: execution timed out."
    else:
        text = (rr.get("stdout") or "") + (rr.get("stderr") or "")
        if status == "Error" and not text:
            text = "Error: execution failed."
    return truncate(text, limit)


def prepare_code(argument: str, extract: bool = True, print_last: bool = True) -> str:
    code = extract_code(argument) if extract else argument
    return print_last_expression(code) if print_last else code


def call_problem(name: str, arguments: dict, tool_name: str) -> Optional[str]:
    """Why a well-formed call cannot be executed, or None."""
    if name != tool_name:
        return f"unknown tool {name!r}; the only tool is {tool_name!r}"
    code = arguments.get("code")
    if not isinstance(code, str):
        return f"the call to {tool_name!r} has no \"code\" string argument"
    return None
