"""Errors that describe a problem with the user's input or run directory (no traceback needed)."""


class RunError(ValueError):
    """The run cannot start or continue as asked (world size, run directory, resume mismatch)."""


class CheckpointError(ValueError):
    """A checkpoint is damaged, incomplete, or from a different config."""


class AgreedStop(RunError):
    """Setup failed on rank 0 and every rank was told: all of them exit cleanly together."""
