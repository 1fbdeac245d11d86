"""Math and multiple-choice answers: the reference's strict last-``\\boxed{}`` rule, optionally
math-verify equivalence.

Strict rule (DAPO-style, as the paper): take the final 100 characters of the response, find the last
``\\boxed{`` in them and its balanced closing brace; ``pred`` is the content (``""`` if there is no
complete box); score 1.0 when ``pred == ground_truth`` as strings (no normalisation), else -1.0.
``\\boxed {x}`` (a space) is not a box; ``\\boxed{\\text{A}}`` has pred ``\\text{A}``.
"""

from __future__ import annotations

from typing import Optional

WINDOW = 100  # characters of the response the reference searches for the box
BOX = "\\boxed{"


def last_boxed(text: str, window: Optional[int] = WINDOW) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` within the final ``window`` characters (None: all
    of ``text``); None when there is none or its braces do not close."""
    if window is not None:
        text = text[-window:]
    start = text.rfind(BOX)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(BOX) - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOX):i]
    return None


def score_strict(solution: str, ground_truth: str) -> dict:
    pred = last_boxed(solution)
    pred = "" if pred is None else pred
    ok = pred == str(ground_truth)
    return {"score": 1.0 if ok else -1.0, "acc": ok, "pred": pred}


def score_math_verify(solution: str, ground_truth: str, timeout_s: int = 5) -> dict:
    """The strict extraction, then ``math_verify`` equivalence of ``\\boxed{pred}`` and
    ``\\boxed{ground_truth}`` (e.g. ``\\frac{1}{2}`` = ``0.5``). math-verify's own timeouts use SIGALRM,
    so call this in a worker process's main thread (the :class:`RewardPool` does)."""
    from math_verify import parse, verify

    out = score_strict(solution, ground_truth)
    if out["acc"] or not out["pred"]:
        return out
    gold = parse(f"{BOX}{ground_truth}}}", parsing_timeout=timeout_s)
    target = parse(f"{BOX}{out['pred']}}}", parsing_timeout=timeout_s)
    ok = bool(gold) and bool(target) and verify(gold, target, timeout_seconds=timeout_s)
    return {"score": 1.0 if ok else -1.0, "acc": ok, "pred": out["pred"]}
