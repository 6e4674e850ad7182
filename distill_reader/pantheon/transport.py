"""Authenticated, integrity-checked, framed TCP messages between Pantheon teachers and students (no pickle).

A connection starts with a mutual HMAC-SHA256 challenge on a shared token (RFC 2104 HMAC over the two random
nonces); both sides then derive one key per direction from the token and the nonces and carry frames::

    !IQ (header length, body length) | JSON header | body = raw array buffers | HMAC-SHA256 tag (32 bytes)

The tag covers a per-direction frame counter, the prefix, the header and the body, so a frame changed, dropped,
replayed or reordered in flight is refused (``ProtocolError``). Frames are not encrypted: run Pantheon on a
network you trust for confidentiality (see docs/security.md).

The header holds the message kind and a JSON tree of the value in which numpy arrays, bytes, tuples, sets
and dicts are tagged objects pointing into the body (``frames.py``). Only numeric and bool dtypes travel; nothing
is ever unpickled, so a peer can at worst send wrong numbers, never run code.

Untrusted input is bounded: a frame longer than the receiver's limit (``frame_limit``: sized from the knowledge
description, at least 64 MiB, raised with ``max_frame_bytes``) is refused from its 12-byte prefix, memory is
allocated as the bytes arrive (never from the declared length up front), and any malformed frame closes the
connection with ``ProtocolError`` raised in the waiting ``recv()``. The teacher's listener runs every handshake
side by side with a short deadline, so connections that never speak cannot keep the student out.

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
import logging
import os
import select
import selectors
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from distill_base.endpoints import parse_endpoint

from .errors import AuthenticationError, ConnectionLost, ForkedConnectionError, PantheonError, ProtocolError
from .frames import (
    DEFAULT_MAX_FRAME,
    FRAME_SLACK,
    MAX_BATCH_SAMPLES,
    PREFIX,
    decode_frame,
    encode_frame,
    frame_limit,
    raw_frame,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_MAX_FRAME", "FRAME_SLACK", "MAX_BATCH_SAMPLES", "MAX_PENDING_HANDSHAKES",
    "AuthenticationError", "Connection", "ConnectionLost", "Listener", "PantheonError", "ProtocolError", "connect",
    "decode_frame", "encode_frame", "frame_limit", "parse_address", "resolve_timeout", "resolve_token",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "DISTILL_PANTHEON_TOKEN"
TIMEOUT_ENV = "DISTILL_PANTHEON_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
DEFAULT_HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to complete the handshake
MAX_PENDING_HANDSHAKES = 32  # handshakes in progress at once; the oldest is dropped for a new one

_MAGIC = b"PNTH2"
_NONCE = 32
_MAC = 32
_SEQ = struct.Struct("!Q")
_HELLO = len(_MAGIC) + _NONCE + _MAC
_IOV_CHUNK = 256
_FIRST_CHUNK = 1 << 20  # a frame's buffer starts at most this big and doubles as bytes arrive


def resolve_token(token: str | bytes | None) -> bytes:
    """The shared token from the argument, else from ``$DISTILL_PANTHEON_TOKEN``; error when neither is set.

    Raises:
        ValueError: no token given and ``$DISTILL_PANTHEON_TOKEN`` not set.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"online Pantheon mode needs a shared token: pass token=... or set ${TOKEN_ENV} to the "
                         "same secret in the teacher and the student processes")
    return token.encode() if isinstance(token, str) else bytes(token)


def resolve_timeout(timeout: Optional[float]) -> float:
    """The timeout from the argument, else ``$DISTILL_PANTHEON_TIMEOUT``, else 60 seconds.

    Raises:
        ValueError: the timeout is not positive.
    """
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return float(timeout)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6 address]:port"``) -> ``(host, port)``; ValueError naming the address otherwise
    (the project's one endpoint parser, ``distill_base.endpoints``)."""
    endpoint = parse_endpoint(str(address), what="teacher address", allow_wildcard=False)
    return endpoint.host, endpoint.port


# ---------------------------------------------------------------- connection


class Connection:
    """One authenticated peer: thread-safe ``send``, single-reader ``recv``, background heartbeats.

    Every frame carries an HMAC-SHA256 tag under the key of its direction (``keys = (send_key, recv_key)``,
    from the handshake) over a frame counter, so a changed, replayed or reordered frame is refused.
    ``recv`` raises :class:`ConnectionLost` when the peer closes, dies, or sends nothing (not even a
    heartbeat) for ``timeout`` seconds while we wait for it, and :class:`ProtocolError` (after closing the
    connection) for a frame longer than ``max_frame_bytes``, failing its MAC, or malformed.

    Fork: in a child process after ``os.fork()``, ``send`` and ``recv`` raise :class:`ForkedConnectionError` (the
    socket and frame counters are the parent's), and ``close`` closes only the child's copy of the descriptor,
    never shutting the parent's connection down.
    """

    def __init__(self, sock: socket.socket, peer: str, timeout: float, keys: Tuple[bytes, bytes],
                 max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.peer = peer
        self.timeout = timeout
        self.max_frame_bytes = frame_limit(max_frame_bytes=max_frame_bytes)
        self._sock = sock
        self._send_key, self._recv_key = keys
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._last_sent = time.monotonic()
        self._pid = os.getpid()
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._heartbeat = threading.Thread(target=self._beat, name=f"pantheon-heartbeat-{peer}", daemon=True)
        self._heartbeat.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, kind: str, value: Any = None, **fields: Any) -> None:
        """Send one frame; ConnectionLost if the peer is gone."""
        self._send_sealed(encode_frame(kind, value, **fields))

    def _send_frame(self, header_bytes: bytes, buffers: List[memoryview]) -> None:
        """Send a frame from raw header bytes (tests use it to send malformed frames with a valid MAC)."""
        self._send_sealed(raw_frame(header_bytes, buffers))

    def _seal(self, frame: List[memoryview]) -> List[memoryview]:
        """``frame`` plus its MAC tag under the next send counter (call with the send lock held)."""
        mac = hmac.new(self._send_key, _SEQ.pack(self._send_seq), hashlib.sha256)
        for buffer in frame:
            mac.update(buffer)
        self._send_seq += 1
        return [*frame, memoryview(mac.digest())]

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedConnectionError(
                f"the connection to {self.peer} was opened by process {self._pid} and is used in its forked child "
                f"{os.getpid()}: parent and child would share one socket and mix their frames; create the Student "
                "or Teacher in the child (or start it with multiprocessing's 'spawn' method)")

    def _send_sealed(self, frame: List[memoryview]) -> None:
        self._check_process()   # before the lock: a parent thread may have held it at the fork
        with self._send_lock:
            if self.closed:
                raise ConnectionLost(f"connection to {self.peer} is closed")
            try:
                _send_buffers(self._sock, self._seal(frame))
            except OSError as exc:
                self._shutdown()
                raise ConnectionLost(f"lost the connection to {self.peer} while sending: {exc}") from exc
            self._last_sent = time.monotonic()

    def recv(self) -> tuple[str, Any, dict]:
        """The next frame as ``(kind, value, header)``; heartbeats are skipped."""
        self._check_process()
        while True:
            try:
                kind, value, header = self._recv_frame()
            except ProtocolError:
                self._shutdown()
                raise
            if kind != "ping":
                return kind, value, header

    def _recv_frame(self) -> tuple[str, Any, dict]:
        prefix = bytes(self._read(PREFIX.size))
        header_len, body_len = PREFIX.unpack(prefix)
        if header_len + body_len > self.max_frame_bytes:
            raise ProtocolError(f"{self.peer} announced a frame of {header_len}+{body_len} bytes, which exceeds the "
                                f"limit of {self.max_frame_bytes} bytes (raise it with max_frame_bytes=... on the "
                                "receiving Teacher or Student if the knowledge batches really are that large)")
        mac = hmac.new(self._recv_key, _SEQ.pack(self._recv_seq) + prefix, hashlib.sha256)
        header = self._read(header_len, mac)
        body = self._read(body_len, mac)
        tag = self._read(_MAC)
        if not hmac.compare_digest(bytes(tag), mac.digest()):
            raise ProtocolError(f"frame {self._recv_seq} from {self.peer} failed its integrity check (changed, "
                                "replayed or reordered in flight, or the peer's key differs)")
        self._recv_seq += 1
        return decode_frame(header, body)

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
            if os.getpid() != self._pid:
                return   # a forked child: shutdown() would end the parent's connection too
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read(self, size: int, mac: Optional[Any] = None) -> bytearray:
        """Exactly ``size`` bytes; the buffer grows (doubling) as they arrive, never to ``size`` up front."""
        buf = bytearray(min(size, _FIRST_CHUNK))
        got = 0
        while got < size:
            if got == len(buf):
                buf.extend(bytes(min(size - got, len(buf))))
            self._wait_readable()
            try:
                with memoryview(buf) as view:
                    n = self._sock.recv_into(view[got:], len(buf) - got)
                    if mac is not None and n:
                        mac.update(view[got:got + n])
            except OSError as exc:
                self._shutdown()
                raise ConnectionLost(f"lost the connection to {self.peer}: {exc}") from exc
            if n == 0:
                self._shutdown()
                raise ConnectionLost(f"{self.peer} closed the connection")
            got += n
        return buf

    def _wait_readable(self) -> None:
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

    def _beat(self) -> None:
        interval = max(0.05, min(self.timeout / 4.0, 5.0))
        while not self._closed.wait(interval / 2):
            if time.monotonic() - self._last_sent < interval:
                continue
            try:
                self._send_sealed(encode_frame("ping"))
            except ConnectionLost:
                return


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


def _session_keys(token: bytes, nonce_s: bytes, nonce_c: bytes) -> Dict[str, bytes]:
    """One frame key per direction, derived from the token and both handshake nonces."""
    return {direction: hmac.new(token, b"pantheon frames " + direction.encode() + nonce_s + nonce_c,
                                hashlib.sha256).digest() for direction in ("t2s", "s2t")}


def _recv_until(sock: socket.socket, size: int, deadline: float, what: str) -> bytes:
    """``size`` bytes before ``deadline`` (monotonic), however slowly the peer sends them."""
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionLost(f"{what} did not complete the handshake in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(data))
        except socket.timeout:
            raise ConnectionLost(f"{what} did not complete the handshake in time") from None
        if not chunk:
            raise ConnectionLost(f"{what} closed the connection during the handshake")
        data += chunk
    return data


class _Pending:
    """A connection whose handshake is in progress: the teacher's nonce, the bytes received, its deadline."""

    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.nonce = os.urandom(_NONCE)
        self.hello = b""


class Listener:
    """The teacher's listening socket; ``accept`` returns the first peer that proves it knows the token.

    Handshakes run side by side (one selector, no thread per connection), each with ``handshake_timeout``
    seconds to complete; at most ``MAX_PENDING_HANDSHAKES`` are in progress, a new connection dropping the
    oldest. So connections that never speak (or speak too slowly) cannot keep the real student out.

    Args:
        host: the address to bind (``"0.0.0.0"``: every IPv4 interface; ``"::"`` every IPv6 one; or one address).
        port: the TCP port (0: any free port, see ``address``).
        token: the shared secret.
        handshake_timeout: seconds a connection has to complete the handshake.
        max_frame_bytes: the longest frame accepted from the student (see ``frame_limit``).

    Example::

        listener = Listener("0.0.0.0", 8080, token=b"secret")
        conn = listener.accept(timeout=60)
    """

    def __init__(self, host: str, port: int, token: bytes, handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        """Check the arguments.

        Raises:
            ValueError: ``handshake_timeout`` <= 0.
            PantheonError: the port cannot be bound.
        """
        if handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout must be positive, got {handshake_timeout}")
        self._token = token
        self._handshake_timeout = float(handshake_timeout)
        self._max_frame = frame_limit(max_frame_bytes=max_frame_bytes)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, int(port)), family=family, backlog=64)
        except OSError as exc:
            raise PantheonError(f"teacher cannot listen on {host}:{port}: {exc}") from exc
        self._sock.setblocking(False)
        self.address = self._sock.getsockname()
        self.refused = 0
        self.timed_out = 0

    def accept(self, timeout: float) -> Connection:
        """Wait up to ``timeout`` seconds for an authenticated student; wrong tokens are refused and logged.

        Raises:
            PantheonError: no authenticated student connected within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ, None)
        pending: Dict[socket.socket, _Pending] = {}
        try:
            while True:
                now = time.monotonic()
                for state in [p for p in pending.values() if p.deadline <= now]:
                    self.timed_out += 1
                    logger.warning("dropped a connection from %s: no Pantheon handshake within %gs", state.peer,
                                   self._handshake_timeout)
                    self._drop(selector, pending, state)
                if now >= deadline:
                    raise PantheonError(f"no student connected to port {self.address[1]} within {timeout:g}s"
                                        + self._refusals())
                wake = min([deadline] + [p.deadline for p in pending.values()])
                for key, _ in selector.select(max(0.0, wake - now)):
                    if key.data is None:
                        self._accept_new(selector, pending)
                        continue
                    conn = self._advance(selector, pending, key.data, timeout)
                    if conn is not None:
                        return conn
        finally:
            for state in list(pending.values()):
                self._drop(selector, pending, state)
            selector.close()

    def _refusals(self) -> str:
        out = ""
        if self.refused:
            out += f"; refused {self.refused} connection(s) with a wrong token (check ${TOKEN_ENV})"
        if self.timed_out:
            out += f"; dropped {self.timed_out} connection(s) that did not complete the handshake"
        return out

    def _accept_new(self, selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending]) -> None:
        try:
            sock, addr = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer = f"{addr[0]}:{addr[1]}"
        if len(pending) >= MAX_PENDING_HANDSHAKES:
            oldest = min(pending.values(), key=lambda p: p.deadline)
            logger.warning("%d handshakes in progress: dropping the oldest, from %s", len(pending), oldest.peer)
            self._drop(selector, pending, oldest)
        state = _Pending(sock, peer, time.monotonic() + self._handshake_timeout)
        try:
            sock.setblocking(False)
            sock.send(_MAGIC + state.nonce)  # 37 bytes into an empty socket buffer
        except OSError as exc:
            logger.info("connection from %s lost before the handshake: %s", peer, exc)
            sock.close()
            return
        pending[sock] = state
        selector.register(sock, selectors.EVENT_READ, state)

    def _advance(self, selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending],
                 state: _Pending, timeout: float) -> Optional[Connection]:
        try:
            chunk = state.sock.recv(_HELLO - len(state.hello))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            logger.info("handshake with %s failed: %s", state.peer, exc)
            self._drop(selector, pending, state)
            return None
        if not chunk:
            logger.info("%s closed the connection during the handshake", state.peer)
            self._drop(selector, pending, state)
            return None
        state.hello += chunk
        if len(state.hello) < _HELLO:
            return None
        selector.unregister(state.sock)
        del pending[state.sock]
        sock, hello = state.sock, state.hello
        try:
            sock.settimeout(max(0.1, state.deadline - time.monotonic()))
            if hello[:len(_MAGIC)] != _MAGIC:
                logger.error("refused a connection from %s: it does not speak the Pantheon protocol (%s)", state.peer,
                             _MAGIC.decode())
                sock.close()
                return None
            nonce_c = hello[len(_MAGIC):len(_MAGIC) + _NONCE]
            if not hmac.compare_digest(hello[-_MAC:], _mac(self._token, b"student", state.nonce, nonce_c)):
                self.refused += 1
                logger.error("refused a student connection from %s: wrong Pantheon token (the teacher and the "
                             "student must share the same token, see $%s)", state.peer, TOKEN_ENV)
                sock.sendall(b"DENY")
                sock.close()
                return None
            sock.sendall(b"OKAY" + _mac(self._token, b"teacher", nonce_c, state.nonce))
        except OSError as exc:
            logger.info("handshake with %s failed: %s", state.peer, exc)
            sock.close()
            return None
        keys = _session_keys(self._token, state.nonce, nonce_c)
        return Connection(sock, f"student {state.peer}", timeout, (keys["t2s"], keys["s2t"]), self._max_frame)

    @staticmethod
    def _drop(selector: selectors.BaseSelector, pending: Dict[socket.socket, _Pending], state: _Pending) -> None:
        pending.pop(state.sock, None)
        try:
            selector.unregister(state.sock)
        except (KeyError, ValueError):
            pass
        state.sock.close()

    def close(self) -> None:
        self._sock.close()


def connect(address: str, token: bytes, timeout: float, retry_until: Optional[float] = None,
            max_frame_bytes: int = DEFAULT_MAX_FRAME,
            handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> Connection:
    """Connect to a teacher at ``"host:port"``, retrying refused connections until ``retry_until``.

    Raises AuthenticationError at once when the teacher refuses the token (no retry), PantheonError when
    the teacher is not reachable in time.

    Raises:
        AuthenticationError: the teacher refused the token (at once, no retry).
        PantheonError: the teacher was not reachable within the time allowed.
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
            keys = _client_handshake(sock, address, token, time.monotonic() + min(timeout, handshake_timeout))
        except (OSError, ConnectionLost) as exc:  # teacher restarting, or its listener just closed
            sock.close()
            last_error = exc
            time.sleep(0.1)
            continue
        except BaseException:
            sock.close()
            raise
        return Connection(sock, f"teacher {address}", timeout, (keys["s2t"], keys["t2s"]), max_frame_bytes)
    waited = timeout if retry_until is None else retry_until
    raise PantheonError(f"teacher at {address} not reachable within {waited:g}s (last error: {last_error})")


def _client_handshake(sock: socket.socket, address: str, token: bytes, deadline: float) -> Dict[str, bytes]:
    what = f"teacher at {address}"
    hello = _recv_until(sock, len(_MAGIC) + _NONCE, deadline, what)
    if hello[:len(_MAGIC)] != _MAGIC:
        raise ProtocolError(f"{address} is not a Pantheon teacher of this version (unexpected greeting)")
    nonce_s = hello[len(_MAGIC):]
    nonce_c = os.urandom(_NONCE)
    sock.sendall(_MAGIC + nonce_c + _mac(token, b"student", nonce_s, nonce_c))
    verdict = _recv_until(sock, 4, deadline, what)
    if verdict == b"DENY":
        raise AuthenticationError(f"teacher at {address} refused our token: the student's Pantheon token differs "
                                  f"from the teacher's (pass the same token=... or ${TOKEN_ENV} to both)")
    if verdict != b"OKAY":
        raise ProtocolError(f"{address} answered the handshake with {verdict!r}")
    proof = _recv_until(sock, _MAC, deadline, what)
    if not hmac.compare_digest(proof, _mac(token, b"teacher", nonce_c, nonce_s)):
        raise AuthenticationError(f"teacher at {address} could not prove it knows the token: refusing it")
    return _session_keys(token, nonce_s, nonce_c)
