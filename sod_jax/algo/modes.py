"""The one table of RL algorithm modes (``algo.name``, DESIGN §1.2): what each mode needs and uses.

=============  ====================  ===================  ===================  ===================
mode           teacher log-probs q   loads a teacher      privileged context   distillation
               in the advantage      (``teacher.path``)   (q from the student  weights
                                                          itself, opsd)
=============  ====================  ===================  ===================  ===================
``grpo``       no                    no                   --                   --
``opd``        yes                   yes                  --                   --
``sod``        yes                   yes                  --                   SOD step weights
``gated_opd``  yes                   yes                  --                   --
``opsd_gt``    yes                   no                   ground truth         --
``opsd_hint``  yes                   no                   hint (else g. t.)    --
``iw_opd``     yes                   yes                  --                   IW-OPD token weights
=============  ====================  ===================  ===================  ===================

This module is pure Python and imports nothing (neither jax nor the rest of ``sod_jax``), so
:mod:`sod_jax.config`, a leaf, may import it: config validation, the advantages
(:mod:`sod_jax.algo.advantages`), the update (:mod:`sod_jax.rl.update`) and the RL trainer all read
this table instead of keeping their own lists of mode names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Mode:
    """One algorithm mode's facts."""

    name: str
    teacher_logp: bool  # the teacher's log-probs q enter the advantage (every mode but grpo)
    teacher_model: bool  # a separate frozen teacher model is loaded (teacher.path is required)
    # opsd_*: q comes from the student itself (stop-gradient) on a prompt that also holds this
    # privileged text of the data row: "ground_truth", or "hint" (extra_info.hint, else the ground truth).
    privileged: Optional[str] = None
    # Per-token weights of the distillation term: "step" (SOD step weights), "iw" (IW-OPD); None: 1.
    weights: Optional[str] = None

    @property
    def self_teacher(self) -> bool:
        """The "teacher" is the student on a privileged context (its sequence differs from the student's)."""
        return self.privileged is not None

    def privileged_text(self, row: Mapping[str, Any]) -> str:
        """The privileged text this mode adds to the prompt of a data ``row`` (opsd_* only)."""
        if self.privileged == "ground_truth":
            return str(row["ground_truth"])
        if self.privileged == "hint":
            return str((row.get("extra_info") or {}).get("hint", row["ground_truth"]))
        raise ValueError(f"algo.name={self.name} uses no privileged context")


TABLE: tuple[Mode, ...] = (
    Mode("grpo", teacher_logp=False, teacher_model=False),
    Mode("opd", teacher_logp=True, teacher_model=True),
    Mode("sod", teacher_logp=True, teacher_model=True, weights="step"),
    Mode("gated_opd", teacher_logp=True, teacher_model=True),
    Mode("opsd_gt", teacher_logp=True, teacher_model=False, privileged="ground_truth"),
    Mode("opsd_hint", teacher_logp=True, teacher_model=False, privileged="hint"),
    Mode("iw_opd", teacher_logp=True, teacher_model=True, weights="iw"),
)
MODES: dict[str, Mode] = {m.name: m for m in TABLE}
NAMES: tuple[str, ...] = tuple(MODES)  # every algo.name, in the table's order


def get(name: str) -> Mode:
    """The mode called ``name``; an unknown name is an error that lists the known ones."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown algorithm mode {name!r}; known: {', '.join(NAMES)}") from None


def uses_teacher_logp(name: str) -> bool:
    """The mode's advantage reads the teacher's log-probs q."""
    return get(name).teacher_logp


def needs_teacher_model(name: str) -> bool:
    """The mode loads a separate teacher model (``teacher.path`` must be set)."""
    return get(name).teacher_model


def self_teacher(name: str) -> bool:
    """The mode's q comes from the student itself on a privileged context (opsd_*)."""
    return get(name).self_teacher


def without_teacher_model() -> tuple[str, ...]:
    """The modes that run without ``teacher.path``."""
    return tuple(m.name for m in TABLE if not m.teacher_model)
