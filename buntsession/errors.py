"""The package's own exceptions. Every one of them derives from `Error`."""

from __future__ import annotations

import os

__all__ = ["CorruptFileError", "Error", "FileLockedError", "SessionTypeError", "StoreError"]


class Error(Exception):
    """Base class of every exception that buntsession raises on purpose."""


class CorruptFileError(Error):
    """A data file is damaged before its tail, is not a buntsession file, or has a newer format version.

    `path` names the file and `offset` the byte where the damage starts. The file is left untouched.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: {reason} at byte offset {offset}")


class FileLockedError(Error):
    """The data file is held by another owner: another process, another `DB` object, or a fork of the owner."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = os.fspath(path)
        super().__init__(
            f"{self.path}: {detail}. One file has one owner; for several worker processes of one app on one "
            "host, open it with DB(path, shared=True) in every one of them (each process then holds every "
            "session in memory and reads the others' writes before it reads), or use Redis across hosts"
        )


class StoreError(Error):
    """A store cannot do its job: an I/O failure, a failed fsync, a closed DB, an unreachable server.

    The original error, when there is one, is the `__cause__`.
    """


class SessionTypeError(Error, TypeError):
    """A typed session getter found a value of another type under the key."""
