"""Crash-safe file replacement: a reader sees the old file or the whole new one, never a part.

Example::

    atomic_write("serving_conf/serving_client_conf.prototxt", text.encode())
"""
from __future__ import annotations

import os


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path.tmp``, fsync it, rename it over ``path`` and fsync the folder (durable rename)."""
    temp = path + ".tmp"
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(directory: str) -> None:
    """Make the entries of ``directory`` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
