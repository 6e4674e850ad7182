"""Shared memory for large tasks: anonymous memfd blocks, passed to a worker over its socket (SCM_RIGHTS).

The student copies a large task's feeds once into a block (``SharedBuffer.write``), sends the block's file
descriptor once (``send_fd``, after a ``MapBuffer`` message), and describes each feed as a ``SharedArray``; the
worker maps the block (``recv_fd``) and reads the feeds as views (``view``), no copy. Anonymous memfds leave
nothing behind when either side dies. Linux only (``os.memfd_create``).

Example::

    block = SharedBuffer(1, 1 << 20)
    described = block.write({"img": images})       # {"img": SharedArray(1, 0, "<f4", (400, 1, 28, 28))}
    send_fd(conn, block.fd)                         # the worker: mapping = mmap.mmap(recv_fd(conn), 1 << 20)
    view(mapping, described["img"])                 # in the worker: the same array, no copy
"""
from __future__ import annotations

import mmap
import os
import socket
from multiprocessing.connection import Connection
from typing import Mapping, Optional

import numpy as np

from .worker_messages import SharedArray

ALIGN = 64   # each feed starts at a multiple of this many bytes


class SharedBuffer:
    """An anonymous shared memory block (memfd) mapped by the student and by one worker."""

    def __init__(self, buffer_id: int, size: int):
        self.buffer_id = buffer_id
        self.size = size
        self.fd = os.memfd_create(f"distill-task-{buffer_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.task_id: Optional[int] = None   # the task whose feeds it holds, None when free

    @staticmethod
    def needed(feeds: Mapping[str, np.ndarray], nbytes: int) -> int:
        """Bytes a block needs to hold ``feeds`` (``nbytes`` of data) with each feed aligned."""
        return nbytes + ALIGN * len(feeds)

    def write(self, feeds: Mapping[str, np.ndarray]) -> dict[str, SharedArray]:
        """Copy ``feeds`` into the block (it must be large enough: ``needed``); their descriptions for the worker."""
        described, offset = {}, 0
        for name, value in feeds.items():
            array = np.asarray(value)
            target = np.ndarray(array.shape, dtype=array.dtype, buffer=self.map, offset=offset)
            np.copyto(target, array)
            described[name] = SharedArray(self.buffer_id, offset, array.dtype.str, tuple(array.shape))
            offset += -(-array.nbytes // ALIGN) * ALIGN
        return described

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:
            pass


def view(mapping: mmap.mmap, shared: SharedArray) -> np.ndarray:
    """The array ``shared`` describes, as a view of the worker's mapping of its block."""
    return np.ndarray(shared.shape, dtype=np.dtype(shared.dtype), buffer=mapping, offset=shared.offset)


def send_fd(conn: Connection, fd: int) -> None:
    """Send one file descriptor over the connection's socket (SCM_RIGHTS)."""
    carrier = socket.socket(fileno=conn.fileno())
    try:
        socket.send_fds(carrier, [b"F"], [fd])
    finally:
        carrier.detach()


def recv_fd(conn: Connection) -> int:
    """Receive one file descriptor sent by ``send_fd``; the caller closes it.

    Raises:
        EOFError: the socket ended, or the message carried no descriptor.
    """
    carrier = socket.socket(fileno=conn.fileno())
    try:
        _, fds, _, _ = socket.recv_fds(carrier, 1, 1)
    finally:
        carrier.detach()
    if not fds:
        raise EOFError("no file descriptor received")
    return fds[0]
