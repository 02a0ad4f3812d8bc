"""Errors that describe a problem with the user's input or run directory (no traceback needed).

Every one of them derives from ``UserError``: the CLI and the MPI abort hook print its message as
one line (exit code 2 before any work, or an abort naming the rank after), while anything else is
a bug and keeps its traceback. ``UserError`` subclasses ``ValueError`` so code that already
catches ``ValueError`` for bad input keeps working.
"""


class UserError(ValueError):
    """Bad input: a config key, a file, a run directory, a checkpoint. The message says which."""


class RunError(UserError):
    """The run cannot start or continue as asked (world size, run directory, resume mismatch)."""


class CheckpointError(UserError):
    """A checkpoint is damaged, incomplete, or from a different config."""


class AgreedStop(RunError):
    """Setup failed on rank 0 and every rank was told: all of them exit cleanly together."""
