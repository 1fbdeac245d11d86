"""The strict last-\\boxed{} rule, GPQA letters, math-verify equivalence and the source registry."""

from __future__ import annotations

import pytest

from sod_jax.config import load_config
from sod_jax.rewards import (
    BUILTIN_SOURCES,
    UnknownSourceError,
    check_sources,
    compute_score,
    last_boxed,
    score_math_verify,
)


@pytest.mark.parametrize("text, pred", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{1} then \\boxed{2}", "2"),  # several boxes: the last
    ("no box here", None),
    ("\\boxed{3 and an unbalanced {", None),
    ("\\boxed{12}" + " more text" * 11, None),  # the box lies before the final 100 characters
    ("x" * 200 + "\\boxed{7}" + "y" * 80, "7"),  # within the window
    ("\\boxed {5}", None),  # a space: not a box
    ("\\boxed{\\text{A}}", "\\text{A}"),
    ("\\boxed{}", ""),
    ("\\boxed{a}}", "a"),
])
def test_last_boxed(text, pred):
    assert last_boxed(text) == pred


def test_strict_scores():
    assert compute_score("math_dapo", "\\boxed{12}", "12") == {"score": 1.0, "acc": True, "pred": "12"}
    assert compute_score("AIME2025", "\\boxed{12.0}", "12") == {"score": -1.0, "acc": False, "pred": "12.0"}
    assert compute_score("AIME2024", "nothing", "12") == {"score": -1.0, "acc": False, "pred": ""}
    assert compute_score("math", "\\boxed{ 12}", "12")["acc"] is False  # no normalisation, as the reference
    assert compute_score("demo_chain", "<tool_response>9</tool_response> \\boxed{9}", "9")["acc"]
    # the whole response is scored: a box inside a tool turn near the end counts
    assert compute_score("math", "\\boxed{3}<|im_end|>", "3")["acc"]


def test_gpqa_letters():
    assert compute_score("gpqa_diamond", "I pick \\boxed{B}", "B")["acc"]
    assert not compute_score("gpqa_diamond", "I pick \\boxed{b}", "B")["acc"]
    assert compute_score("gpqa_diamond", "\\boxed{\\text{B}}", "B") == {"score": -1.0, "acc": False,
                                                                       "pred": "\\text{B}"}
    assert compute_score("choice", "\\boxed{(C)}", "C")["pred"] == "(C)"


def test_math_verify_equivalences():
    for pred, gt in (("0.5", "\\frac{1}{2}"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("10.0", "10"),
                     ("1+x", "x+1")):
        assert score_math_verify(f"\\boxed{{{pred}}}", gt)["acc"], (pred, gt)
    assert not score_math_verify("\\boxed{3}", "2")["acc"]
    assert score_math_verify("no box", "2") == {"score": -1.0, "acc": False, "pred": ""}
    cfg = load_config(None, ["algo.name=grpo", "reward.math_verify=true"])
    assert compute_score("AIME2024", "\\boxed{0.5}", "\\frac{1}{2}", reward_cfg=cfg.reward)["score"] == 1.0
    assert compute_score("AIME2024", "\\boxed{0.5}", "\\frac{1}{2}")["score"] == -1.0


def test_registry():
    for src in ("math_dapo", "mega-science", "AIME2024", "AIME2025", "gpqa_diamond", "LiveCodeBench_v6",
                "math", "choice", "code", "demo_chain"):
        assert src in BUILTIN_SOURCES
    with pytest.raises(UnknownSourceError) as e:
        check_sources(["AIME2024", "my_olympiad", "zzz"])
    msg = str(e.value)
    assert "'my_olympiad', 'zzz'" in msg and "AIME2024" in msg and "reward.sources" in msg
    cfg = load_config(None, ["algo.name=grpo", "reward.sources={my_olympiad: math, zzz: choice}"])
    check_sources(["AIME2024", "my_olympiad", "zzz"], cfg.reward)
    assert compute_score("zzz", "\\boxed{A}", "A", reward_cfg=cfg.reward)["acc"]
    with pytest.raises(UnknownSourceError):
        compute_score("zzz", "\\boxed{A}", "A")
    with pytest.raises(Exception, match="scorers are math, choice, code"):
        load_config(None, ["algo.name=grpo", "reward.sources={x: regex}"])


def test_response_text_keeps_think_and_tool_tags(tokenizer_dir):
    from sod_jax.chat import ChatTokenizer
    from sod_jax.rewards import response_text

    tok = ChatTokenizer.from_dir(tokenizer_dir)
    text = "<think>\nplan\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>\n<|im_start|>user\n\\boxed{4}<|im_end|>"
    out = response_text(tok, tok.encode(text))
    assert "</think>" in out and "<tool_call>" in out and "<|im_end|>" not in out and out.endswith("\\boxed{4}")
