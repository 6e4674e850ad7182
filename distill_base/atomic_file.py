"""Crash-safe file replacement: a reader sees the old file or the whole new one, never a part.

Example::

    atomic_write("serving_conf/serving_client_conf.prototxt", text.encode())
"""
from __future__ import annotations

import os


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path.tmp``, fsync it, rename it over ``path`` and fsync the folder (durable rename).

    The temporary is created exclusively without following links (``O_CREAT | O_EXCL | O_NOFOLLOW``): a leftover
    or planted ``path.tmp`` (even a link to a file elsewhere) is unlinked as a name, never written through.
    """
    temp = path + ".tmp"
    with os.fdopen(create_exclusive(temp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path) or ".")


def create_exclusive(path: str, mode: int = 0o666) -> int:
    """Create ``path`` anew for writing (``O_CREAT | O_EXCL | O_NOFOLLOW``) and return its descriptor.

    A leftover of that name (a crashed writer's temporary, or a planted link) is unlinked first as a name, never
    followed; a directory of that name, or a name that reappears at once, is an ``OSError``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)  # the link or file itself; IsADirectoryError for a directory
    return os.open(path, flags, mode)


def fsync_dir(directory: str) -> None:
    """Make the entries of ``directory`` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
