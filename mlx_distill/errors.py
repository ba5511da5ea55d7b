"""Errors that reach the user as one line.

`BadInput` is anything the user can fix (a recipe key, a missing file, a wrong cache): the CLI
prints its message and exits 2. Every other exception is a failure while running: exit 1.
"""


class BadInput(Exception):
    """A problem with the user's input: recipe, data file, model folder, cache. Exit code 2."""


class StageFailed(Exception):
    """A stage failed while running; the message names the stage. Exit code 1."""
