"""The one exception type the command line turns into a one-line ``error:`` message."""

from __future__ import annotations

from pathlib import Path


class SparsifyError(Exception):
    """A problem with the user's input (a file, a table, an option), stated in one line.

    ``str(err)`` is the whole message; when ``path`` is given it is prefixed, giving the
    ``<file>: <what is wrong>`` form the command line prints after ``error:``.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.reason = " ".join(str(message).split())  # one line, whatever the caller passed
        super().__init__(self.reason if self.path is None else f"{self.path}: {self.reason}")
