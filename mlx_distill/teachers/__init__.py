"""Teacher libraries: a local mlx-lm model (`local.py`: score, generate) and Google Gemini
(`gemini.py` with its client, Batch API, limits and prices; `align.py` and `gemini_cache.py`
turn its answers into token targets). Their stage hooks live in `mlx_distill.stages`."""

from mlx_distill.teachers.base import Completion, Teacher, TokenCandidates

__all__ = ["Completion", "Teacher", "TokenCandidates"]
