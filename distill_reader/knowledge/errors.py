"""Errors raised by the knowledge files; each names the cache, shard or sample it is about."""
from __future__ import annotations

from typing import Optional


class KnowledgeError(Exception):
    """Base class: a knowledge cache cannot be written or read as asked."""


class FormatError(KnowledgeError):
    """The manifest is missing, malformed, of another version, or describes unsafe or inconsistent content."""


class CorruptShardError(KnowledgeError):
    """A shard file is missing, truncated, or its checksum differs from the manifest. ``.shard`` is its file name."""

    def __init__(self, message: str, shard: str) -> None:
        super().__init__(message)
        self.shard = shard


class InputMismatchError(KnowledgeError):
    """The inputs given now differ from those the cache was written for.

    ``.sample`` is the first differing sample index, ``.shard`` the shard file holding it.
    """

    def __init__(self, message: str, sample: int, shard: Optional[str]) -> None:
        super().__init__(message)
        self.sample = sample
        self.shard = shard


class UnsafeFileError(KnowledgeError):
    """A file of the cache (manifest, lock, temporary) is a symbolic link, FIFO, directory or device.

    It is never followed nor opened as a file: a cache may come from someone else. ``.file`` is its name.
    """

    def __init__(self, message: str, file: str) -> None:
        super().__init__(message)
        self.file = file


class UnsafeShardError(CorruptShardError):
    """A shard file is a symbolic link, FIFO, directory or device: never followed nor read. ``.shard`` is its name."""


class SizeLimitError(KnowledgeError):
    """A size the cache declares is beyond what its bytes back, or a read would allocate more than allowed
    (``KnowledgeReader(max_dense_bytes=...)``)."""
