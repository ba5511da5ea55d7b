"""The one table of stages: what each reads, hashes, writes and keeps, and where it runs.

Every other module that needs a fact about the stages reads it here: the fingerprints (sections
and upstream), the runner (outputs cleared on a fresh start, entries kept, which ranks work), the
preflight (data splits read), the CLI (the `teach` and `train` groups) and the staleness messages
(what a stage made). The order is the recipe's `STAGES`; a stage's body is `stages.BODIES[name]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_distill.recipe import STAGES


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # recipe sections its fingerprint hashes
    upstream: tuple[str, ...]  # stages it reads from (their fingerprints are in its own)
    made: str  # what it makes, for "... since <it was made>" in a refusal
    reads: tuple[str, ...] = ()  # data splits it reads (checked before any stage writes)
    # Run-directory entries (glob patterns) it writes besides its own folder: cleared when it
    # starts over.
    outputs: tuple[str, ...] = ()
    # Entries of its folder that starting over never deletes: an API teacher's paid-for answers
    # (their keys say which model and parameters made them; a rerun reads the ones it needs).
    keep: tuple[str, ...] = ()
    group: str | None = None  # the command that runs it with its group: "teach" or "train"
    # In a distributed group: "all" ranks work on it (their share of the rows, batches or
    # problems), rank 0 alone ("main") while the others wait, or as the teacher kind says
    # ("teacher": `TeacherKind.data_parallel`).
    ranks: str = "main"


TABLE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "tokenizer",
            sections=("data", "tokenizer"),
            upstream=(),
            made="the tokenizer stage ran",
            reads=("train",),
            group="teach",
        ),
        Stage(
            "teacher",
            sections=("teacher", "data"),
            upstream=("tokenizer",),
            made="the teacher stage ran",
            reads=("train", "valid"),
            outputs=("checkpoints/teacher",),
            keep=("records",),
            group="teach",
            ranks="teacher",
        ),
        Stage(
            "cache",
            sections=("cache", "data"),
            upstream=("teacher",),
            made="the teacher cache was built",
            reads=("train",),
            group="teach",
            ranks="teacher",
        ),
        Stage(
            "distill",
            sections=("student", "loss", "distill", "train", "refine", "data", "export"),
            upstream=("cache",),
            made="the KD student was trained",
            reads=("train", "valid"),
            # student-*: the quantized exports, the adapters, distill.compare's students and the
            # student before refinement; checkpoints/distill-*: compare runs and refinement
            outputs=("student", "student-*", "checkpoints/distill", "checkpoints/distill-*"),
            group="train",
            ranks="all",
        ),
        Stage(
            "baseline",
            sections=("student", "train", "refine", "data"),
            upstream=("tokenizer", "teacher"),
            made="the baseline was trained",
            reads=("train", "valid"),
            outputs=(
                "checkpoints/baseline",
                "checkpoints/baseline-refine",
                "baseline-adapters",
                "baseline-before-refine",
            ),
            group="train",
            ranks="all",
        ),
        Stage(
            "eval",
            sections=("eval", "data"),
            upstream=("teacher", "distill", "baseline"),
            made="the evaluation ran",
            reads=("test", "valid"),  # valid: scored in place of a missing data.test
            ranks="all",
        ),
        Stage(
            "report",
            sections=(),
            upstream=("eval", "distill", "baseline"),
            made="the report was written",
        ),
    )
}
assert tuple(TABLE) == STAGES, "the stage table and recipe.STAGES must list the same stages"


def enabled(recipe) -> list[str]:
    """The recipe's stages (`recipe.stages`), in stage order."""
    return [s for s in STAGES if s in recipe.stages]


def group(name: str) -> list[str]:
    """The stages of command group `name` ("teach" or "train"), in order."""
    return [s.name for s in TABLE.values() if s.group == name]


def upstream_of(names: list[str], enabled: list[str]) -> list[str]:
    """Enabled stages that `names` read from, transitively, in stage order."""
    needed: set[str] = set()
    frontier = list(names)
    while frontier:
        for upstream in TABLE[frontier.pop()].upstream:
            if upstream in enabled and upstream not in needed:
                needed.add(upstream)
                frontier.append(upstream)
    return [s for s in enabled if s in needed]
