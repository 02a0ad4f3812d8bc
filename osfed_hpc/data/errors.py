"""The one exception type of the data layer.

Bad input data (a missing shard, a truncated file, a partition made for another dataset) is a
user error, not a bug, so it gets its own type: the CLI can print its message without a traceback,
and tests can tell it apart from programming errors. It subclasses ``ValueError`` so callers that
already catch ``ValueError`` for bad configuration keep working. Every message names the file (and
key / index / client) and says what was expected.
"""

from __future__ import annotations

from ..errors import UserError


class DataError(UserError):
    """A dataset, shard, partition or argument that the data layer cannot use."""
