"""Opening files inside a knowledge cache that may come from someone else: no links, no FIFOs, no directories.

Every open uses ``O_NOFOLLOW`` (a symbolic link is refused, never followed out of the folder) and ``O_NONBLOCK``
(opening a FIFO never waits for a writer), then checks the opened descriptor with ``fstat`` (a regular file, not a
FIFO, directory or device), so what is checked is what is read. Temporaries are created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (``create_exclusive``): a planted file or link of the same name is removed (the
link itself, never its target) and the file is created anew.

Example::

    fd, size = open_regular("/data/cache/manifest.json", UnsafeFileError, "manifest.json")
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Tuple

from distill_base.atomic_file import create_exclusive

__all__ = ["create_exclusive", "kind_of", "lstat_problem", "open_regular", "remove_entry"]

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def kind_of(mode: int) -> str:
    """``"a regular file"``, ``"a FIFO"``, ``"a directory"``, ... for an ``st_mode``."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str, unsafe: Callable[[str, str], Exception], name: str) -> Tuple[int, int]:
    """Open ``path`` read-only without following a link or blocking; return ``(fd, size)`` of a regular file.

    Raises ``unsafe(message, name)`` for a link, FIFO, directory or device; ``FileNotFoundError`` and other
    ``OSError`` as they come.

    Raises:
        unsafe (an UnsafeFileError class): ``path`` is a link, FIFO, directory or device.
        OSError: as ``os.open`` raises it (``FileNotFoundError`` for a missing file).
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise unsafe(f"{path} is a symbolic link: links inside a knowledge cache are never followed",
                         name) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise unsafe(f"{path} is {kind_of(info.st_mode)}, not a regular file: refused", name)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def lstat_problem(path: str) -> str:
    """Why ``path`` cannot be a file of the cache (``"missing"``, ``"a symbolic link"``, ...), or "" when regular."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    return "" if stat.S_ISREG(info.st_mode) else kind_of(info.st_mode)


def remove_entry(path: str) -> None:
    """Remove one entry of the cache folder as a name: a link is unlinked (never its target), a real directory
    removed with its content (``shutil.rmtree`` does not follow links inside it)."""
    import shutil

    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
