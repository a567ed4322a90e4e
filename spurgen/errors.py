"""User-facing errors.

Every problem caused by input (a flag, a file, a folder, a setting) raises :class:`SpurgenError`
with a single line naming the problem and the fix. The CLI prints it and exits with ``exit_code``
(2 by default) instead of a traceback.
"""

from __future__ import annotations


class SpurgenError(Exception):
    """An error the user can fix; its message is one line: the problem, then the fix."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
