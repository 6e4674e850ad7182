"""Authenticated, framed TCP messages between Pantheon teachers and students (no pickle anywhere).

A connection starts with a mutual HMAC-SHA256 challenge on a shared token, then carries frames::

    !IQ (header length, body length) | JSON header | body = raw array buffers, back to back

The header holds the message kind and a JSON tree of the value in which numpy arrays, bytes, tuples, sets
and dicts are tagged objects pointing into the body. Only numeric and bool dtypes travel; nothing is ever
unpickled, so a peer can at worst send wrong numbers, never run code.

Example::

    server = Listener("127.0.0.1", 0, token=b"secret")
    conn = server.accept(timeout=10)          # in the teacher
    conn = connect("127.0.0.1:%d" % port, token=b"secret", timeout=10)   # in the student
    conn.send("batch", {"logits": np.zeros((2, 10), "float32")})
    kind, value, header = conn.recv()
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)

TOKEN_ENV = "DISTILL_PANTHEON_TOKEN"
TIMEOUT_ENV = "DISTILL_PANTHEON_TIMEOUT"
DEFAULT_TIMEOUT = 60.0

_MAGIC = b"PNTH1"
_NONCE = 32
_MAC = 32
_PREFIX = struct.Struct("!IQ")
_MAX_HEADER = 64 << 20
_MAX_BODY = 16 << 30
_ALLOWED_KINDS = set("biufc")  # bool, signed, unsigned, float, complex
_IOV_CHUNK = 256


class PantheonError(RuntimeError):
    """Base class of every Pantheon failure (connection, protocol, knowledge mismatch)."""


class AuthenticationError(PantheonError):
    """The peer did not present the shared token."""


class ConnectionLost(PantheonError):
    """The peer closed the connection, died, or stayed silent longer than the timeout."""


class ProtocolError(PantheonError):
    """The peer sent something that is not a valid Pantheon frame."""


def resolve_token(token: str | bytes | None) -> bytes:
    """The shared token from the argument, else from ``$DISTILL_PANTHEON_TOKEN``; error when neither is set."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"online Pantheon mode needs a shared token: pass token=... or set ${TOKEN_ENV} to the "
                         "same secret in the teacher and the student processes")
    return token.encode() if isinstance(token, str) else bytes(token)


def resolve_timeout(timeout: Optional[float]) -> float:
    """The timeout from the argument, else ``$DISTILL_PANTHEON_TIMEOUT``, else 60 seconds."""
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return float(timeout)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)`` with a clear error for anything else."""
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"teacher address {address!r} is not of the form '<host>:<port>' (e.g. '127.0.0.1:8080')")
    return host, int(port)


# ---------------------------------------------------------------- value encoding


def _encode(value: Any, buffers: list) -> Any:
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot send an array of dtype {value.dtype}: only bool and numeric arrays travel")
        array = np.ascontiguousarray(value)
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b""))
        return {"__nd__": [len(buffers) - 1, array.dtype.str, list(array.shape)]}
    if isinstance(value, np.generic):
        return {"__scalar__": _encode(np.asarray(value), buffers)}
    if isinstance(value, list):
        return [_encode(item, buffers) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, buffers) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(item, buffers) for item in value]}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, buffers), _encode(v, buffers)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        buffers.append(memoryview(bytes(value)))
        return {"__bytes__": len(buffers) - 1}
    raise TypeError(f"cannot send a {type(value).__name__}: Pantheon messages carry None, bool, int, float, str, "
                    "list, tuple, set, dict, bytes and numpy arrays (no pickle)")


def _decode(tree: Any, arrays: list) -> Any:
    if isinstance(tree, list):
        return [_decode(item, arrays) for item in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) != 1:
        raise ProtocolError(f"malformed value tag {sorted(tree)!r}")
    tag, inner = next(iter(tree.items()))
    if tag == "__nd__" or tag == "__bytes__":
        index = inner[0] if tag == "__nd__" else inner
        return arrays[index]
    if tag == "__scalar__":
        return _decode(inner, arrays)[()]
    if tag == "__tuple__":
        return tuple(_decode(item, arrays) for item in inner)
    if tag == "__set__":
        return {_decode(item, arrays) for item in inner}
    if tag == "__dict__":
        return {_decode(k, arrays): _decode(v, arrays) for k, v in inner}
    raise ProtocolError(f"unknown value tag {tag!r}")


def encode_frame(kind: str, value: Any = None, **fields: Any) -> list[memoryview]:
    """The buffers of one frame (prefix+header first, then the array buffers)."""
    buffers: list = []
    header = dict(fields, k=kind, v=_encode(value, buffers), b=[b.nbytes for b in buffers])
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    body_len = sum(b.nbytes for b in buffers)
    return [memoryview(_PREFIX.pack(len(header_bytes), body_len) + header_bytes), *buffers]


def _arrays_from_body(header: dict, body: bytearray) -> list:
    """Views into ``body`` for every buffer the header describes (arrays, or bytes for ``__bytes__``)."""
    specs: dict = {}

    def collect(tree: Any) -> None:
        if isinstance(tree, list):
            for item in tree:
                collect(item)
        elif isinstance(tree, dict):
            for tag, inner in tree.items():
                if tag == "__nd__":
                    specs[inner[0]] = inner
                else:
                    collect(inner)

    collect(header.get("v"))
    lengths = header.get("b", [])
    if sum(lengths) != len(body):
        raise ProtocolError(f"frame body has {len(body)} bytes but its header describes {sum(lengths)}")
    arrays, offset = [], 0
    for index, length in enumerate(lengths):
        spec = specs.get(index)
        if spec is None:
            arrays.append(bytes(body[offset:offset + length]))
        else:
            dtype = np.dtype(spec[1])
            shape = tuple(int(d) for d in spec[2])
            if dtype.kind not in _ALLOWED_KINDS:
                raise ProtocolError(f"refusing an array of dtype {dtype}")
            count = int(np.prod(shape, dtype=np.int64))
            if count * dtype.itemsize != length:
                raise ProtocolError(f"array of shape {shape} and dtype {dtype} does not fit its {length} bytes")
            if count == 0:
                arrays.append(np.empty(shape, dtype))
            else:
                arrays.append(np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset += length
    return arrays


# ---------------------------------------------------------------- connection


class Connection:
    """One authenticated peer: thread-safe ``send``, single-reader ``recv``, background heartbeats.

    ``recv`` raises :class:`ConnectionLost` when the peer closes, dies, or sends nothing (not even a
    heartbeat) for ``timeout`` seconds while we wait for it.
    """

    def __init__(self, sock: socket.socket, peer: str, timeout: float) -> None:
        self.peer = peer
        self.timeout = timeout
        self._sock = sock
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._last_sent = time.monotonic()
        sock.settimeout(None)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._heartbeat = threading.Thread(target=self._beat, name=f"pantheon-heartbeat-{peer}", daemon=True)
        self._heartbeat.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, kind: str, value: Any = None, **fields: Any) -> None:
        """Send one frame; ConnectionLost if the peer is gone."""
        frame = encode_frame(kind, value, **fields)
        with self._send_lock:
            if self.closed:
                raise ConnectionLost(f"connection to {self.peer} is closed")
            try:
                _send_buffers(self._sock, frame)
            except OSError as exc:
                self._shutdown()
                raise ConnectionLost(f"lost the connection to {self.peer} while sending: {exc}") from exc
            self._last_sent = time.monotonic()

    def recv(self) -> tuple[str, Any, dict]:
        """The next frame as ``(kind, value, header)``; heartbeats are skipped."""
        while True:
            prefix = self._read_exact(_PREFIX.size)
            header_len, body_len = _PREFIX.unpack(prefix)
            if header_len > _MAX_HEADER or body_len > _MAX_BODY:
                raise ProtocolError(f"{self.peer} announced a frame of {header_len}+{body_len} bytes")
            try:
                header = json.loads(bytes(self._read_exact(header_len)))
            except ValueError as exc:
                raise ProtocolError(f"{self.peer} sent a header that is not JSON: {exc}") from exc
            body = self._read_exact(body_len)
            kind = header.get("k")
            if kind == "ping":
                continue
            return kind, _decode(header.get("v"), _arrays_from_body(header, body)), header

    def close(self) -> None:
        """Close the socket (idempotent); the heartbeat thread ends with it."""
        self._shutdown()
        try:
            self._sock.close()
        except OSError:
            pass

    def _shutdown(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read_exact(self, size: int) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            if self.closed:
                raise ConnectionLost(f"connection to {self.peer} is closed")
            try:
                ready, _, _ = select.select([self._sock], [], [], self.timeout)
            except (OSError, ValueError) as exc:  # closed under us by close()
                raise ConnectionLost(f"connection to {self.peer} is closed") from exc
            if not ready:
                self._shutdown()
                raise ConnectionLost(f"{self.peer} sent nothing (not even a heartbeat) for {self.timeout:g}s: "
                                     "the peer is hung or the network is down")
            try:
                n = self._sock.recv_into(view[got:], size - got)
            except OSError as exc:
                self._shutdown()
                raise ConnectionLost(f"lost the connection to {self.peer}: {exc}") from exc
            if n == 0:
                self._shutdown()
                raise ConnectionLost(f"{self.peer} closed the connection")
            got += n
        return buf

    def _beat(self) -> None:
        interval = max(0.05, min(self.timeout / 4.0, 5.0))
        ping = encode_frame("ping")
        while not self._closed.wait(interval / 2):
            if time.monotonic() - self._last_sent < interval:
                continue
            with self._send_lock:
                if self.closed:
                    return
                try:
                    _send_buffers(self._sock, list(ping))
                except OSError:
                    self._shutdown()
                    return
                self._last_sent = time.monotonic()


def _send_buffers(sock: socket.socket, buffers: list) -> None:
    pending = [b for b in buffers if b.nbytes]
    while pending:
        sent = sock.sendmsg(pending[:_IOV_CHUNK])
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0


# ---------------------------------------------------------------- handshake


def _mac(token: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, role + first + second, hashlib.sha256).digest()


def _recv_exact_blocking(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionLost("peer closed the connection during the handshake")
        data += chunk
    return data


class Listener:
    """The teacher's listening socket; ``accept`` returns the first peer that proves it knows the token.

    Example::

        listener = Listener("0.0.0.0", 8080, token=b"secret")
        conn = listener.accept(timeout=60)
    """

    def __init__(self, host: str, port: int, token: bytes) -> None:
        self._token = token
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, int(port)))
        except OSError as exc:
            self._sock.close()
            raise PantheonError(f"teacher cannot listen on {host}:{port}: {exc}") from exc
        self._sock.listen(8)
        self.address = self._sock.getsockname()
        self.refused = 0

    def accept(self, timeout: float) -> Connection:
        """Wait up to ``timeout`` seconds for an authenticated student; wrong tokens are refused and logged."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._sock], [], [], max(0.0, remaining))
            if not ready:
                refused = (f"; refused {self.refused} connection(s) with a wrong token (check ${TOKEN_ENV})"
                           if self.refused else "")
                raise PantheonError(f"no student connected to port {self.address[1]} within {timeout:g}s{refused}")
            sock, addr = self._sock.accept()
            peer = f"{addr[0]}:{addr[1]}"
            try:
                if self._handshake(sock, peer, min(max(remaining, 1.0), 10.0)):
                    return Connection(sock, f"student {peer}", timeout)
            except (OSError, PantheonError) as exc:
                logger.error("handshake with %s failed: %s", peer, exc)
            sock.close()

    def _handshake(self, sock: socket.socket, peer: str, timeout: float) -> bool:
        sock.settimeout(timeout)
        nonce_s = os.urandom(_NONCE)
        sock.sendall(_MAGIC + nonce_s)
        hello = _recv_exact_blocking(sock, len(_MAGIC) + _NONCE + _MAC)
        if hello[:len(_MAGIC)] != _MAGIC:
            raise ProtocolError(f"{peer} does not speak the Pantheon protocol")
        nonce_c = hello[len(_MAGIC):len(_MAGIC) + _NONCE]
        if not hmac.compare_digest(hello[-_MAC:], _mac(self._token, b"student", nonce_s, nonce_c)):
            self.refused += 1
            logger.error("refused a student connection from %s: wrong Pantheon token (the teacher and the student "
                         "must share the same token, see $%s)", peer, TOKEN_ENV)
            try:
                sock.sendall(b"DENY")
            except OSError:
                pass
            return False
        sock.sendall(b"OKAY" + _mac(self._token, b"teacher", nonce_c, nonce_s))
        return True

    def close(self) -> None:
        self._sock.close()


def connect(address: str, token: bytes, timeout: float, retry_until: Optional[float] = None) -> Connection:
    """Connect to a teacher at ``"host:port"``, retrying refused connections until ``retry_until``.

    Raises AuthenticationError at once when the teacher refuses the token (no retry), PantheonError when
    the teacher is not reachable in time.
    """
    host, port = parse_address(address)
    deadline = time.monotonic() + (timeout if retry_until is None else retry_until)
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=min(timeout, 10.0))
        except OSError as exc:
            last_error = exc
            time.sleep(0.1)
            continue
        try:
            _client_handshake(sock, address, token)
        except (OSError, ConnectionLost) as exc:  # teacher busy with another student, or restarting
            sock.close()
            last_error = exc
            time.sleep(0.1)
            continue
        except BaseException:
            sock.close()
            raise
        return Connection(sock, f"teacher {address}", timeout)
    waited = timeout if retry_until is None else retry_until
    raise PantheonError(f"teacher at {address} not reachable within {waited:g}s (last error: {last_error})")


def _client_handshake(sock: socket.socket, address: str, token: bytes) -> None:
    hello = _recv_exact_blocking(sock, len(_MAGIC) + _NONCE)
    if hello[:len(_MAGIC)] != _MAGIC:
        raise ProtocolError(f"{address} is not a Pantheon teacher (unexpected greeting)")
    nonce_s = hello[len(_MAGIC):]
    nonce_c = os.urandom(_NONCE)
    sock.sendall(_MAGIC + nonce_c + _mac(token, b"student", nonce_s, nonce_c))
    verdict = _recv_exact_blocking(sock, 4)
    if verdict == b"DENY":
        raise AuthenticationError(f"teacher at {address} refused our token: the student's Pantheon token differs "
                                  f"from the teacher's (pass the same token=... or ${TOKEN_ENV} to both)")
    if verdict != b"OKAY":
        raise ProtocolError(f"{address} answered the handshake with {verdict!r}")
    proof = _recv_exact_blocking(sock, _MAC)
    if not hmac.compare_digest(proof, _mac(token, b"teacher", nonce_c, nonce_s)):
        raise AuthenticationError(f"teacher at {address} could not prove it knows the token: refusing it")
