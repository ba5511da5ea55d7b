"""Teachers: a local mlx-lm model (`local.py`) or Google Gemini (`gemini.py`)."""

from mlx_distill.teachers.base import (
    KINDS,
    Completion,
    Teacher,
    TeacherKind,
    TokenCandidates,
    teacher_kind,
)

__all__ = ["KINDS", "Completion", "Teacher", "TeacherKind", "TokenCandidates", "teacher_kind"]
