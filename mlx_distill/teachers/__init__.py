"""Teachers: a local mlx-lm model (`local.py`) or Google Gemini (`gemini.py`)."""

from mlx_distill.teachers.base import Completion, Teacher, TokenCandidates

__all__ = ["Completion", "Teacher", "TokenCandidates"]
