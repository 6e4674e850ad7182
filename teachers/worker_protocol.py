"""The wire between the teacher server and its predictor worker processes (``teachers.predictor_worker``).

Two parts, each with one job:

- **Control messages**: small JSON documents, one per datagram, on an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair
  (message boundaries kept, reliable, ordered; unnamed, so no other process can reach it). Every message is a
  JSON object with a ``kind``: ``start``, ``ready``, ``job``, ``need``, ``grown``, ``answer``, ``error``, ``stop``
  (docs/architecture.md has the whole protocol). No pickle, no array data: at most ``MAX_MESSAGE`` bytes.
- **Tensors**: ``multiprocessing.shared_memory`` blocks created by the server (mode 0600, random names), one for
  a worker's inputs and one for its outputs, reused from job to job and replaced by a bigger one when a batch
  does not fit; a job message carries the layout: ``[name, dtype, shape, offset]`` per array. A worker attaches
  to the blocks by name and never creates or unlinks one, so the server alone owns (and unlinks) them.

Example::

    block = create_block(1 << 20)
    layout = write_arrays(block, {"x": np.ones((2, 3), "float32")})   # [["x", "<f4", [2, 3], 0]]
    arrays = read_arrays(block, layout)                               # views on the block
"""
from __future__ import annotations

import json
import socket
import sys
from contextlib import contextmanager
from multiprocessing import shared_memory
from typing import Iterator, Mapping, Optional

import numpy as np

MAX_MESSAGE = 1 << 20        # a control message never carries tensor data: 1 MiB is far more than any needs
ALIGN = 64                   # arrays start on cache-line boundaries in a block
MIN_BLOCK = 1 << 20          # smallest block: 1 MiB
_DTYPES = frozenset(np.dtype(t).str for t in ("bool", "int8", "uint8", "int16", "int32", "int64", "float16",
                                              "float32", "float64", "complex64", "complex128"))


class ProtocolError(RuntimeError):
    """A message or layout that breaks the protocol (a bug, or a peer that is not a predictor worker)."""


# -- control messages -----------------------------------------------------------------------------------
def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(server end, worker end) of a new control channel; the worker end is inheritable (``pass_fds``)."""
    server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_end.set_inheritable(True)
    return server_end, worker_end


def send(sock: socket.socket, kind: str, **fields) -> None:
    """Send one message ``{"kind": kind, **fields}``.

    Raises ProtocolError when it would be over MAX_MESSAGE; OSError (BrokenPipeError, ...) when the peer is gone.

    Raises:
        ProtocolError: the message would be over MAX_MESSAGE.
        OSError: the peer is gone (BrokenPipeError, ...).
    """
    data = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{kind} message of {len(data)} bytes is over the limit of {MAX_MESSAGE}")
    sock.send(data)


def receive(sock: socket.socket) -> Optional[dict]:
    """The next message, or None when the peer closed the channel (it exited or died).

    Raises ProtocolError for a message that is not a JSON object with a string ``kind``.

    Raises:
        ProtocolError: a message that is not JSON, or not an object with a string ``kind``.
    """
    try:
        data = sock.recv(MAX_MESSAGE + 1)
    except ConnectionResetError:
        return None
    if not data:
        return None
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise ProtocolError(f"control message without a kind: {data[:80]!r}")
    return message


# -- shared memory blocks --------------------------------------------------------------------------------
def create_block(size: int) -> shared_memory.SharedMemory:
    """A new block of at least ``size`` bytes (rounded up to whole MiB, at least MIN_BLOCK); the caller unlinks it."""
    size = max(MIN_BLOCK, -(-int(size) // MIN_BLOCK) * MIN_BLOCK)
    return shared_memory.SharedMemory(create=True, size=size)


def release_block(block: Optional[shared_memory.SharedMemory], unlink: bool = True) -> None:
    """Close (and by default unlink) ``block``; already gone is fine."""
    if block is None:
        return
    try:
        block.close()
    except BufferError:      # a view still refers to it: the mapping goes when the view does
        pass
    if unlink:
        try:
            block.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def _untracked() -> Iterator[None]:
    """Python < 3.13 registers every *attached* block with a resource tracker, which unlinks it when the
    attaching process exits: a worker must not do that to the server's blocks."""
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None
    try:
        yield
    finally:
        resource_tracker.register = register


def attach_block(name: str) -> shared_memory.SharedMemory:
    """Attach to the server's block ``name`` (worker side) without taking ownership of it.

    Raises FileNotFoundError when no such block exists."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    with _untracked():
        return shared_memory.SharedMemory(name=name)


def layout_size(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes ``write_arrays`` needs for ``arrays``."""
    return sum(-(-a.nbytes // ALIGN) * ALIGN for a in arrays.values())


def write_arrays(block: shared_memory.SharedMemory, arrays: Mapping[str, np.ndarray]) -> list:
    """Copy ``arrays`` into ``block`` back to back (aligned); returns their layout for a message.

    Raises ProtocolError when they do not fit (check ``layout_size`` first).

    Raises:
        ProtocolError: the arrays do not fit ``block``.
    """
    if layout_size(arrays) > block.size:
        raise ProtocolError(f"{layout_size(arrays)} bytes of arrays do not fit a block of {block.size}")
    layout, offset = [], 0
    for name, array in arrays.items():
        view = np.ndarray(array.shape, array.dtype, buffer=block.buf, offset=offset)
        np.copyto(view, array, casting="no")
        layout.append([name, array.dtype.str, list(array.shape), offset])
        offset += -(-array.nbytes // ALIGN) * ALIGN
    return layout


def read_arrays(block: shared_memory.SharedMemory, layout: list, copy: bool = False) -> dict[str, np.ndarray]:
    """The arrays of ``layout`` in ``block``: views on the block, or private copies with ``copy``.

    Raises ProtocolError for a layout entry that is malformed or reaches past the block.

    Raises:
        ProtocolError: a layout entry is malformed or reaches past the block.
    """
    arrays = {}
    for entry in layout:
        try:
            name, dtype, shape, offset = entry
            dtype = np.dtype(dtype)
            shape = tuple(int(d) for d in shape)
            offset = int(offset)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed layout entry {entry!r}: {exc}") from None
        if dtype.str not in _DTYPES or any(d < 0 for d in shape) or offset < 0 or offset % ALIGN:
            raise ProtocolError(f"layout entry {entry!r} is not an array this protocol carries")
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if offset + nbytes > block.size:
            raise ProtocolError(f"array {name!r} ({nbytes} bytes at {offset}) reaches past the block of {block.size}")
        view = np.ndarray(shape, dtype, buffer=block.buf, offset=offset)
        arrays[name] = view.copy() if copy else view
    return arrays
