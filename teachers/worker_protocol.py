"""The wire between the teacher server and its predictor worker processes (``teachers.predictor_worker``).

Two parts, each with one job:

- **Control messages**: one per datagram on an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair (message boundaries
  kept, reliable, ordered; unnamed, so no other process can reach it), at most ``MAX_MESSAGE`` bytes, no pickle,
  no array data. The two messages of every run, ``job`` and ``answer``, are a fixed little-endian ``struct``
  header (first byte ``J`` / ``A``) followed by their layout entries and names (``send_job``, ``send_answer``);
  the rare ones (``start``, ``ready``, ``place``, ``need``, ``grown``, ``error``, ``stop``) are JSON objects
  (first byte ``{``) with a ``kind``. ``receive`` gives both as the same dict (docs/architecture.md has the whole
  protocol).
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
import math
import socket
import struct
import sys
import threading
from contextlib import contextmanager
from multiprocessing import shared_memory
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

MAX_MESSAGE = 1 << 20        # a control message never carries tensor data: 1 MiB is far more than any needs
ALIGN = 64                   # arrays start on cache-line boundaries in a block
MIN_BLOCK = 1 << 20          # smallest block: 1 MiB
_DTYPE_LIST = tuple(np.dtype(t).str for t in ("bool", "int8", "uint8", "int16", "int32", "int64", "float16",
                                               "float32", "float64", "complex64", "complex128"))
_DTYPES = frozenset(_DTYPE_LIST)
_DTYPE_OBJECTS = {d: np.dtype(d) for d in _DTYPE_LIST}   # read_arrays: no np.dtype(str) per array
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPE_LIST)}
MAX_NDIM = 64
# binary job / answer messages: header, then per array an entry + its dims (int64) + its name (UTF-8)
_JOB = struct.Struct("<cQHHHH")      # b"J", id, len(in name), len(out name), arrays, fetch names
_ANSWER = struct.Struct("<cQddH")    # b"A", id, seconds, cpu seconds, arrays
_ENTRY = struct.Struct("<QBBH")      # offset, dtype code (_DTYPE_LIST), ndim, len(name)
_NAME = struct.Struct("<H")          # len(fetch name)
_receiving = threading.local()


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

    Raises:
        ProtocolError: the message would be over MAX_MESSAGE.
        OSError: the peer is gone (BrokenPipeError, ...).
    """
    data = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{kind} message of {len(data)} bytes is over the limit of {MAX_MESSAGE}")
    sock.send(data)


def _pack_layout(parts: list, layout: list) -> int:
    for name, dtype, shape, offset in layout:
        raw = name.encode()
        code = _DTYPE_CODE.get(dtype)
        if code is None or len(shape) > MAX_NDIM:
            raise ProtocolError(f"array {name!r} of dtype {dtype}, {len(shape)} dimensions: not an array this "
                                f"protocol carries")
        parts.append(_ENTRY.pack(offset, code, len(shape), len(raw)))
        parts.append(struct.pack(f"<{len(shape)}q", *shape))
        parts.append(raw)
    return len(layout)


def _send_parts(sock: socket.socket, kind: str, parts: list) -> None:
    data = b"".join(parts)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{kind} message of {len(data)} bytes is over the limit of {MAX_MESSAGE}")
    sock.send(data)


def send_job(sock: socket.socket, job: int, inputs: str, outputs: str, layout: list, fetch: Sequence[str]) -> None:
    """Send ``job {id, in, out, feeds: layout, fetch}`` in the binary form (``layout`` from ``write_arrays``).

    Raises:
        ProtocolError: the message would be over MAX_MESSAGE, or an array this protocol cannot carry.
        OSError: the peer is gone.
    """
    raw_in, raw_out = inputs.encode(), outputs.encode()
    parts = [b"", raw_in, raw_out]
    _pack_layout(parts, layout)
    for name in fetch:
        raw = name.encode()
        parts += (_NAME.pack(len(raw)), raw)
    parts[0] = _JOB.pack(b"J", job, len(raw_in), len(raw_out), len(layout), len(fetch))
    _send_parts(sock, "job", parts)


def send_answer(sock: socket.socket, job: int, layout: list, seconds: float, cpu: float) -> None:
    """Send ``answer {id, outputs: layout, seconds, cpu}`` in the binary form.

    Raises:
        ProtocolError: the message would be over MAX_MESSAGE, or an array this protocol cannot carry.
        OSError: the peer is gone.
    """
    parts = [_ANSWER.pack(b"A", job, seconds, cpu, len(layout))]
    _pack_layout(parts, layout)
    _send_parts(sock, "answer", parts)


def _unpack_layout(data: bytes, pos: int, count: int) -> tuple[list, int]:
    layout = []
    for _ in range(count):
        offset, code, ndim, size = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        if code >= len(_DTYPE_LIST) or ndim > MAX_NDIM:
            raise ProtocolError(f"layout entry with dtype code {code}, {ndim} dimensions")
        shape = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        name = data[pos:pos + size].decode()
        pos += size
        layout.append([name, _DTYPE_LIST[code], shape, offset])
    return layout, pos


def _decode_binary(data: bytes) -> dict:
    """The dict of a binary ``job`` / ``answer`` message; ProtocolError when it is malformed or truncated."""
    try:
        if data[:1] == b"J":
            _, job, n_in, n_out, arrays, fetches = _JOB.unpack_from(data)
            pos = _JOB.size
            inputs = data[pos:pos + n_in].decode()
            outputs = data[pos + n_in:pos + n_in + n_out].decode()
            layout, pos = _unpack_layout(data, pos + n_in + n_out, arrays)
            fetch = []
            for _ in range(fetches):
                (size,) = _NAME.unpack_from(data, pos)
                fetch.append(data[pos + 2:pos + 2 + size].decode())
                pos += 2 + size
            message = {"kind": "job", "id": job, "in": inputs, "out": outputs, "feeds": layout, "fetch": fetch}
        else:
            _, job, seconds, cpu, arrays = _ANSWER.unpack_from(data)
            layout, pos = _unpack_layout(data, _ANSWER.size, arrays)
            message = {"kind": "answer", "id": job, "outputs": layout, "seconds": seconds, "cpu": cpu}
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed {data[:1]!r} message of {len(data)} bytes: {exc}") from None
    if pos != len(data):   # a name slice past the end comes back short: the lengths do not add up
        raise ProtocolError(f"malformed {data[:1]!r} message: {len(data)} bytes, its fields say {pos}")
    return message


def receive(sock: socket.socket) -> Optional[dict]:
    """The next message (binary ``job`` / ``answer`` or JSON), or None when the peer closed the channel (it
    exited or died).

    Raises:
        ProtocolError: a malformed binary message, or one that is not a JSON object with a string ``kind``.
    """
    buffer = getattr(_receiving, "buffer", None)
    if buffer is None:   # one per thread, reused: recv(MAX_MESSAGE + 1) would allocate and free 1 MiB each time
        buffer = _receiving.buffer = bytearray(MAX_MESSAGE + 1)
    try:
        size = sock.recv_into(buffer)
    except ConnectionResetError:
        return None
    if not size:
        return None
    data = bytes(memoryview(buffer)[:size])
    if data[:1] in (b"J", b"A"):
        return _decode_binary(data)
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

    Raises:
        ProtocolError: the arrays do not fit ``block`` (check ``layout_size`` first; what was copied before
            the one that does not fit is left in the block).
    """
    layout, offset = [], 0
    buffer, size = block.buf, block.size
    for name, array in arrays.items():
        nbytes = array.nbytes
        if offset + nbytes > size:
            raise ProtocolError(f"{layout_size(arrays)} bytes of arrays do not fit a block of {size}")
        np.copyto(np.ndarray(array.shape, array.dtype, buffer=buffer, offset=offset), array, casting="no")
        layout.append([name, array.dtype.str, array.shape, offset])
        offset += -(-nbytes // ALIGN) * ALIGN
    return layout


def read_arrays(block: shared_memory.SharedMemory, layout: list, copy: bool = False) -> dict[str, np.ndarray]:
    """The arrays of ``layout`` in ``block``: views on the block, or private copies with ``copy``.

    Raises:
        ProtocolError: a layout entry is malformed or reaches past the block.
    """
    arrays = {}
    buffer, size = block.buf, block.size
    for entry in layout:
        try:
            name, dtype, shape, offset = entry
            dtype = _DTYPE_OBJECTS.get(dtype) or np.dtype(dtype)
            if type(shape) is not tuple:    # noqa: E721 - _unpack_layout gives a tuple of ints already
                shape = tuple(int(d) for d in shape)
            offset = int(offset)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed layout entry {entry!r}: {exc}") from None
        if dtype.str not in _DTYPES or offset < 0 or offset % ALIGN or (shape and min(shape) < 0):
            raise ProtocolError(f"layout entry {entry!r} is not an array this protocol carries")
        nbytes = dtype.itemsize * math.prod(shape)
        if offset + nbytes > size:
            raise ProtocolError(f"array {name!r} ({nbytes} bytes at {offset}) reaches past the block of {size}")
        view = np.ndarray(shape, dtype, buffer=buffer, offset=offset)
        arrays[name] = view.copy() if copy else view
    return arrays
