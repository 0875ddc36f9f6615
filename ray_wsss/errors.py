"""The project's exception types. Each names the file, row or key at fault.

The CLI prints `str(error)` as one line; tracebacks are for bugs, not for bad input.
"""
from __future__ import annotations


class WsssError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(WsssError):
    """A config file or override is wrong: names the key and what was expected."""


class DataError(WsssError):
    """Bad input data: names the file and/or row and what is wrong with it."""

    def __init__(self, message: str, *, path: str | None = None, row: str | None = None):
        self.path = path
        self.row = row
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.reason = message


class StageError(WsssError):
    """A pipeline stage cannot run: a missing input, an inconsistent run directory."""


class LockError(StageError):
    """The run directory is owned by another run (`ray_wsss.lock`): names the holder
    and how to break the lock."""
