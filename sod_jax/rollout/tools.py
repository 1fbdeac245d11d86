"""What the agent does with a ``code_interpreter`` call: pick the code, make the last expression
print, run it, and turn the result into the (truncated) tool text the model sees.

Defaults are the reference's (verl's tool agent loop and sandbox-fusion tool, as the SOD run used
them): the tool text is stdout + stderr when the run finished and ``no stdout here`` otherwise; a
text longer than 256 characters keeps its first 128 and last 128 around ``...(truncated)...``; an
unknown tool name is answered ``Error when executing tool: 'name'``. The descriptive failure texts
are the ``descriptive`` option (``tool.failure_text``).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Optional

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
TRUNCATION_MARKER = "...(truncated)..."  # the reference's marker
REFERENCE_FAILURE_TEXT = "no stdout here"  # the reference's text for a run that did not finish
FAILURE_TEXTS = ("reference", "descriptive")


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


def truncate(text: str, limit: int = 256, head: Optional[int] = None, tail: Optional[int] = None,
             marker: str = TRUNCATION_MARKER) -> str:
    """The reference's rule: a text longer than ``limit`` becomes its first ``head`` characters +
    ``marker`` + its last ``tail`` characters; ``head`` and ``tail`` default to ``limit // 2``."""
    if len(text) <= limit:
        return text
    head = limit // 2 if head is None else head
    tail = limit // 2 if tail is None else tail
    return text[:head] + marker + (text[len(text) - tail:] if tail > 0 else "")


def _descriptive_text(response: dict) -> str:
    rr = response.get("run_result") or {}
    status = rr.get("status")
    if response.get("status") == "SandboxError" or not rr:
        return f"Tool execution failed: {response.get('message') or 'sandbox error'}"
    if status == "TimeLimitExceeded":
        return (rr.get("stdout") or "") + (rr.get("stderr") or "") + "\nError: execution timed out."
    text = (rr.get("stdout") or "") + (rr.get("stderr") or "")
    if status == "Error" and not text:
        text = "Error: execution failed."
    return text


def tool_text(response: dict, limit: int = 256, failure_text: str = "reference", head: Optional[int] = None,
              tail: Optional[int] = None) -> str:
    """The observation for a sandbox response, truncated by :func:`truncate`.

    ``failure_text="reference"``: stdout + stderr when the run finished (whatever its exit code),
    ``no stdout here`` otherwise (time limit, start-up error, sandbox down). ``"descriptive"``: the
    same for finished runs, and a text saying what went wrong (plus any partial output) otherwise.
    """
    if failure_text == "reference":
        rr = response.get("run_result") or {}
        if rr.get("status") == "Finished":
            text = (rr.get("stdout") or "") + (rr.get("stderr") or "")
        else:
            text = REFERENCE_FAILURE_TEXT
    elif failure_text == "descriptive":
        text = _descriptive_text(response)
    else:
        raise ValueError(f"unknown failure_text {failure_text!r}; use one of {', '.join(FAILURE_TEXTS)}")
    return truncate(text, limit, head, tail)


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


def reference_call(name: str, arguments: Any, tool_name: str) -> tuple[Optional[str], Optional[str]]:
    """A call as the reference's tool loop treats it: ``(code, None)`` to run, or ``(None, text)``.

    The reference looks the tool up by name (an unknown name raises ``KeyError`` and the model reads
    ``Error when executing tool: 'name'``), then reads ``arguments.get("code", "")`` (arguments that
    are not an object raise ``AttributeError``, answered the same way; a missing ``code`` runs the
    empty program; a non-string ``code`` runs ``str(code)``).
    """
    if name != tool_name:
        return None, f"Error when executing tool: {KeyError(name)}"
    if not isinstance(arguments, dict):
        return None, f"Error when executing tool: '{type(arguments).__name__}' object has no attribute 'get'"
    code = arguments.get("code", "")
    return (code if isinstance(code, str) else str(code)), None
