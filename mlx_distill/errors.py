"""Errors that reach the user as one line.

`BadInput` is anything the user can fix (a recipe key, a missing file, a wrong cache): the CLI
prints its message and exits 2. `StageIncomplete` is a stage that stopped before it was done
and keeps what it has (a teacher stopped at its cost cap): exit 3, and the message says how to
continue. Every other exception is a failure while running: exit 1.
"""


class BadInput(Exception):
    """A problem with the user's input: recipe, data file, model folder, cache. Exit code 2."""


class StageFailed(Exception):
    """A stage failed while running; the message names the stage. Exit code 1."""


class StageIncomplete(Exception):
    """A stage stopped before it was done; what it made is kept and a rerun continues. Exit 3."""
