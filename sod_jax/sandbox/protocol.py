"""The one sandbox protocol, shaped like SandboxFusion's ``/run_code``.

Request: ``{"code", "language", "stdin", "run_timeout", "memory_limit_MB", "files"}`` (``files``: path
-> base64 content, written into the scratch directory before the run).

Response: ``{"status": Success|Failed|SandboxError, "message", "compile_result": None,
"run_result": {"status": Finished|Error|TimeLimitExceeded, "return_code", "stdout", "stderr",
"execution_time"}, "executor_pod_name", "files": {}}``.

``Success`` means the program finished with return code 0; ``Failed`` that it ran but failed (non-zero
exit, time limit, output limit); ``SandboxError`` that the sandbox itself could not run it.
"""

from __future__ import annotations

import socket
from typing import Any, Optional, Protocol

LANGUAGES = ("python", "python3")


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works on this host (and unconfined execution was not allowed)."""


class Sandbox(Protocol):
    async def run(self, request: dict) -> dict: ...

    async def close(self) -> None: ...


def run_request(code: str, *, language: str = "python", stdin: str = "", run_timeout: float = 10.0,
                memory_limit_mb: int = 1024, files: Optional[dict[str, str]] = None) -> dict:
    """A request dict with the protocol's field names."""
    return {"code": code, "language": language, "stdin": stdin, "run_timeout": run_timeout,
            "memory_limit_MB": memory_limit_mb, "files": files or {}}


def sandbox_error(message: str) -> dict:
    """A response for a run the sandbox could not perform."""
    return {"status": "SandboxError", "message": message, "compile_result": None, "run_result": None,
            "executor_pod_name": socket.gethostname(), "files": {}}


def run_response(status: str, return_code: Optional[int], stdout: str, stderr: str, execution_time: float,
                 message: str = "") -> dict:
    """A response for a run that happened. ``status`` is the run_result status."""
    ok = status == "Finished" and return_code == 0
    return {"status": "Success" if ok else "Failed", "message": message, "compile_result": None,
            "run_result": {"status": status, "return_code": return_code, "stdout": stdout, "stderr": stderr,
                           "execution_time": round(execution_time, 4)},
            "executor_pod_name": socket.gethostname(), "files": {}}


def validate_request(req: Any) -> Optional[str]:
    """None if ``req`` is a runnable request, else what is wrong with it."""
    if not isinstance(req, dict):
        return "request must be a JSON object"
    if not isinstance(req.get("code"), str):
        return "'code' must be a string"
    if req.get("language", "python") not in LANGUAGES:
        return f"language {req.get('language')!r} is not supported (supported: {', '.join(LANGUAGES)})"
    for key in ("run_timeout", "memory_limit_MB"):
        if key in req and req[key] is not None and (not isinstance(req[key], (int, float)) or req[key] <= 0):
            return f"'{key}' must be a positive number"
    if req.get("stdin") is not None and not isinstance(req["stdin"], str):
        return "'stdin' must be a string"
    files = req.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                              for k, v in files.items()):
        return "'files' must map paths to base64 strings"
    return None
