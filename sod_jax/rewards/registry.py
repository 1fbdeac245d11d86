"""Which scorer scores which ``data_source``.

Three scorers: ``math`` (last ``\\boxed{}`` string match, or math-verify equivalence), ``choice``
(the same rule on a multiple-choice option letter, GPQA) and ``code`` (LiveCodeBench-style test
execution through the sandbox). The paper's sources and common code-contest source names
(``livecodebench``, ``codecontests``, ``apps``, ``codeforces``, ``taco``) are built in;
``reward.sources`` maps further sources onto a scorer. An unknown source is an error at
start-up (:func:`check_sources`), never a silent fall-back.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

SCORERS = ("math", "choice", "code")

BUILTIN_SOURCES: dict[str, str] = {
    # the generic names
    "math": "math", "choice": "choice", "code": "code",
    # the paper's RL and eval sources (Open-AgentRL-30K / Open-AgentRL-Eval)
    "math_dapo": "math", "mega-science": "math", "AIME2024": "math", "AIME2025": "math",
    "gpqa_diamond": "choice", "LiveCodeBench_v6": "code",
    # common code-contest source names
    "livecodebench": "code", "codecontests": "code", "apps": "code", "codeforces": "code", "taco": "code",
    # the CPU demo's synthetic multi-step tool task (integer answers in \boxed{})
    "demo_chain": "math",
    "demo_check": "math",  # the same, with a check per step (sod_jax/demo/check_task.py)
}


class UnknownSourceError(ValueError):
    """A data_source no scorer is registered for; the message names it and the known ones."""


def source_map(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Built-in sources plus ``extra`` (``reward.sources``: data_source -> scorer name)."""
    out = dict(BUILTIN_SOURCES)
    for src, scorer in (extra or {}).items():
        if scorer not in SCORERS:
            raise UnknownSourceError(f"reward.sources maps {src!r} to {scorer!r}, which is not a scorer; "
                                     f"scorers: {', '.join(SCORERS)}")
        out[src] = scorer
    return out


def scorer_of(data_source: str, extra: Optional[Mapping[str, str]] = None) -> str:
    """The scorer name for ``data_source``; raises :class:`UnknownSourceError`."""
    m = source_map(extra)
    if data_source not in m:
        raise _unknown([data_source], m)
    return m[data_source]


def _unknown(sources: list[str], m: Mapping[str, str]) -> UnknownSourceError:
    return UnknownSourceError(
        f"no reward function for data_source {', '.join(repr(s) for s in sources)}; known sources: "
        f"{', '.join(sorted(m))}. Map it onto a scorer with reward.sources, e.g. "
        f"reward.sources='{{{sources[0]}: math}}' (scorers: {', '.join(SCORERS)})")


def check_sources(sources: Iterable[str], reward_cfg: Any = None) -> None:
    """Raise :class:`UnknownSourceError` naming every source in ``sources`` without a scorer."""
    m = source_map(getattr(reward_cfg, "sources", None) if reward_cfg is not None else None)
    missing = sorted({s for s in sources if s not in m})
    if missing:
        raise _unknown(missing, m)
