"""Every keepalive and connect setting of the student's connections to teachers, in one place.

One default per setting, and one function per transport that turns them into options; ``TeacherClient`` (and
through it the reader's workers and ``RemoteOptions``) read them from here only, so a policy that adapts them
(e.g. to the measured round trip) changes this module alone.

Keepalive pings and servers' ping policies: gRPC servers refuse pings more often than their policy allows
(grpc-core's default: one every 5 minutes without data, two strikes, then GOAWAY ``too_many_pings``, which fails
every call on the connection); Paddle Serving's brpc server and gRPC proxies have policies of their own. So the
client pings only a server known to permit it: ``teachers.serve`` (it answers the standard health service, and
its ping policy in teachers/grpc_front.py allows one ping every 500 ms, no strikes); against any other server pings
are off. A GOAWAY
``too_many_pings`` all the same (a proxy in between) turns them off for that endpoint and the call is retried
once at once on a fresh connection: the teacher is not set aside.

Timeouts that follow the round trip: grpc-core sets TCP_USER_TIMEOUT to the keepalive timeout, so with a fixed
1 s timeout a teacher 1.5 s away loses every connection (its data is not acknowledged within 1 s), and a 2 s
probe cannot finish a new connection's handshakes at that distance. So each process notes the round trips it
measures per endpoint (``note_round_trip``: TCP handshakes and health checks of the probe code; the minimum of
the latest ``ROUND_TRIP_SAMPLES``), and the keepalive timeout becomes ``keepalive_time + max(LINK_SLACK,
ROUND_TRIP_FACTOR x round trip)``, the ping interval ``keepalive_time + round trip`` (pings sent faster than the
round trip fail with "ping timeout" in grpc-core, measured), the connect timeout ``RECONNECT_BACKOFF_INTERVALS x
keepalive_time + CONNECT_ROUND_TRIPS x round trip``. A near teacher (round trip under ``NEGLIGIBLE_ROUND_TRIP``)
gets 1 s + ``LINK_SLACK`` (2 s): its connection survives its link slowing to ~2 s (issue 25: a connection made
near was cut at 1 s when the link slowed to 1.5 s), and a black-holed one's requests fail after about interval +
timeout, 4 s (the reader's stall clock sets it aside at 2 s). A far one: 2.5 s + 7 s at a 1.5 s round trip. The
factor 4 is measured, not derived: on a connection busy with a far teacher's window of requests a ping waits
behind their data, which a link of 1.5 s (slow start: ~10 segments a round trip at first) sends in several
round trips; with 2 (4 s) pings timed out in 1 of 4 runs of the mid-run test, with 4 in none of 3. A connection
cut all the same because its link grew is re-made to fit (``remeasure_round_trip``, ``is_link_timeout``).

Example::

    options = grpc_channel_options(keepalive_time=1.0)            # ours: pings while a request is out
    grpc.insecure_channel("127.0.0.1:9292", options=options)
    note_round_trip("10.0.0.2:9292", 1.5)
    grpc_channel_options(1.0, round_trip=round_trip_of("10.0.0.2:9292"))   # pings every 2.5 s, 7 s timeout
"""
from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Optional

DEFAULT_KEEPALIVE_TIME = 1.0          # s between pings while a request is out (0: off); also the ping timeout
DEFAULT_REQUEST_TIMEOUT = 30.0        # s a teacher has to answer one request (TeacherClient, the reader's workers)
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RECONNECT_BACKOFF_INTERVALS = 2       # first reconnect backoff (the connect timeout) in keepalive intervals
TOO_MANY_PINGS = "too many pings"     # how grpc-core reports a GOAWAY too_many_pings, lower case ...
TOO_MANY_PINGS_ALT = "too_many_pings"  # ... and its debug data
ROUND_TRIP_FACTOR = 4.0      # keepalive timeout = keepalive_time + this x the measured round trip
CONNECT_ROUND_TRIPS = 3       # a new connection: TCP handshake, HTTP/2 settings (TLS: more), + margin
NEGLIGIBLE_ROUND_TRIP = 0.02  # seconds: a smaller round trip leaves the settings as they are
ROUND_TRIP_SAMPLES = 3        # the round trip of an endpoint: the minimum of its latest few measurements
FIRST_PROBE_TIMEOUT = 5.0     # s: a new client's first health check (wire form, pings), grown with the round trip
LINK_SLACK = 2.0             # s: the keepalive timeout (and TCP_USER_TIMEOUT) is at least keepalive_time + this
LINK_TIMEOUT_SIGNS = ("timed out", "ping timeout", "keepalive watchdog timeout")   # grpc-core's words, lower case

_round_trips: dict[str, deque] = {}
_round_trips_lock = threading.Lock()


def note_round_trip(endpoint: str, seconds: float) -> None:
    """Remember a round trip measured to ``endpoint`` (seconds) in this process."""
    if seconds < 0:
        return
    with _round_trips_lock:
        _round_trips.setdefault(endpoint, deque(maxlen=ROUND_TRIP_SAMPLES)).append(float(seconds))


def round_trip_moved(now: float, then: float) -> bool:
    """True when round trip ``now`` is far enough from ``then`` (seconds, 0 = near) that timeouts fitted for
    ``then`` no longer fit: apart by more than 50 ms and more than half the larger."""
    return abs(now - then) > max(0.05, 0.5 * max(now, then))


def is_link_timeout(details: str) -> bool:
    """True for a gRPC error of a pinging connection that the kernel or grpc-core cut for lack of an
    acknowledgement (TCP_USER_TIMEOUT: "Connection timed out"; "ping timeout"; "keepalive watchdog timeout"):
    a dead link, or one that became longer than the connection's timeouts."""
    text = (details or "").lower()
    return any(sign in text for sign in LINK_TIMEOUT_SIGNS)


def remeasure_round_trip(endpoint: str, timeout: float, fitted_for: Optional[float] = None,
                         longer_only: bool = False) -> Optional[float]:
    """One TCP handshake to ``endpoint`` timed (at most ``timeout`` seconds); its round trip, or None when it got
    no answer (a black hole, a dead host). When that moved (``round_trip_moved``) from ``fitted_for`` (seconds,
    0 = near; default: the round trip noted for the endpoint) it replaces the noted ones, so the next probe and
    connection fit the new link; with ``longer_only``, only when it is longer (``moved_longer``).

    Used after a failed health check (the link may have become far, or near again) and after a pinging connection
    fitted for ``fitted_for`` died of a link timeout (only a longer link explains that).

    Example::

        remeasure_round_trip("10.0.0.2:9292", 5.0, fitted_for=0.0, longer_only=True)   # 1.502: slowed to 1.5 s
    """
    now = _time_handshake(endpoint, timeout)
    if now is None:
        return None
    noted = round_trip_of(endpoint)
    then = fitted_for if fitted_for is not None else far(noted)
    unknown = fitted_for is None and noted is None
    if unknown or (moved_longer(now, then) if longer_only else round_trip_moved(far(now), then)):
        with _round_trips_lock:
            _round_trips[endpoint] = deque([now], maxlen=ROUND_TRIP_SAMPLES)
    return now


def moved_longer(now: float, then: float) -> bool:
    """True when round trip ``now`` is longer than ``then`` (seconds, 0 = near) by more than ``round_trip_moved``
    allows: a connection whose timeouts were fitted for ``then`` no longer fits."""
    return far(now) > then and round_trip_moved(far(now), then)


def time_handshakes(endpoint: str, count: int, timeout: float) -> Optional[float]:
    """The least of ``count`` TCP handshakes to ``host:port`` timed at once, each on a connection of its own
    (seconds, also noted), or None when none was answered within ``timeout``.

    Several at once are both quick and robust: they take one round trip together, and a lossy link reads long
    only when every one of them lost its SYN or SYN-ACK (a retransmission: >= 1 s), while a long link reads
    long on each. Answered by the teacher's kernel, they are not held up behind a busy gRPC connection's data.

    Example::

        time_handshakes("10.0.0.2:9292", 3, 3.5)   # 1.503 at a 1.5 s round trip; None: a black hole
    """
    times: list[Optional[float]] = [None] * max(1, count)

    def one(i: int) -> None:
        times[i] = _time_handshake(endpoint, timeout)

    threads = [threading.Thread(target=one, args=(i,), name="handshake", daemon=True) for i in range(len(times))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1.0)
    answered = [t for t in times if t is not None]
    if not answered:
        return None
    note_round_trip(endpoint, min(answered))
    return min(answered)


def latest_round_trip(endpoint: str, count: int) -> Optional[float]:
    """The least of the latest ``count`` round trips this process measured to ``endpoint`` (seconds), or None
    while fewer are known: a link's new round trip once that many probes agree, sooner than ``round_trip_of``."""
    with _round_trips_lock:
        samples = list(_round_trips.get(endpoint, ()))[-count:]
    return min(samples) if len(samples) >= count else None


def round_trip_of(endpoint: str) -> Optional[float]:
    """The round trip to ``endpoint`` this process measured (the minimum of the latest few), or None."""
    with _round_trips_lock:
        samples = _round_trips.get(endpoint)
        return min(samples) if samples else None


def measure_tcp_round_trip(endpoint: str, timeout: float) -> Optional[float]:
    """One TCP handshake to ``host:port`` timed (seconds, also noted), or None (no answer, not host:port).

    The handshake is answered by the peer's kernel, so this is the network's round trip alone.
    """
    elapsed = _time_handshake(endpoint, timeout)
    if elapsed is not None:
        note_round_trip(endpoint, elapsed)
    return elapsed


def is_tcp_endpoint(endpoint: str) -> bool:
    """True for a ``host:port`` endpoint (a TCP handshake can be timed to it), False for ``unix:...`` and others."""
    host, sep, port = endpoint.rpartition(":")
    return bool(sep and host and port.isdigit() and not endpoint.startswith("unix:"))


def _time_handshake(endpoint: str, timeout: float) -> Optional[float]:
    """Seconds one TCP handshake to ``host:port`` took, or None (no answer within ``timeout``, not host:port)."""
    if not is_tcp_endpoint(endpoint):
        return None
    host, _, port = endpoint.rpartition(":")
    start = time.monotonic()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return time.monotonic() - start
    except OSError:
        return None


def far(round_trip: Optional[float]) -> float:
    """``round_trip`` when it is worth adapting a timeout to (0 when unknown or negligible)."""
    return round_trip if round_trip is not None and round_trip >= NEGLIGIBLE_ROUND_TRIP else 0.0


def grpc_channel_options(keepalive_time: float = 0.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                         round_trip: Optional[float] = None) -> list[tuple[str, int]]:
    """grpc channel options: message limits, and with ``keepalive_time`` > 0 pings while a request is out.

    The ping timeout is ``keepalive_time + ROUND_TRIP_FACTOR x round_trip`` (seconds; a round trip under
    ``NEGLIGIBLE_ROUND_TRIP`` or None counts as 0), as grpc-core also uses it for TCP_USER_TIMEOUT.

    grpc-core waits for a ping's acknowledgement for ``grpc.http2.ping_timeout_ms`` (default 1 min), not
    ``keepalive_timeout_ms``: both are set, or a frozen peer is noticed only after a minute. A new connection to a
    frozen peer (TCP accepted, no HTTP/2 SETTINGS) waits for the connect timeout, ``min_reconnect_backoff_ms``
    (default 20 s): two intervals here too.

    Example::

        grpc_channel_options(1.0)   # [..., ("grpc.keepalive_time_ms", 1000), ...]
    """
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    if keepalive_time > 0:
        distance = far(round_trip)
        interval_ms = int((keepalive_time + distance) * 1000)   # grpc-core fails pings sent faster than the RTT
        timeout_ms = int((keepalive_time + max(LINK_SLACK, ROUND_TRIP_FACTOR * distance)) * 1000)
        connect_ms = int((RECONNECT_BACKOFF_INTERVALS * keepalive_time + CONNECT_ROUND_TRIPS * distance) * 1000)
        options += [("grpc.keepalive_time_ms", interval_ms), ("grpc.keepalive_timeout_ms", timeout_ms),
                    ("grpc.http2.ping_timeout_ms", timeout_ms), ("grpc.keepalive_permit_without_calls", 0),
                    ("grpc.http2.max_pings_without_data", 0),
                    ("grpc.min_reconnect_backoff_ms", connect_ms)]
    return options


def probe_timeout_for(timeout: float, round_trip: Optional[float]) -> float:
    """A health probe's timeout: ``timeout``, or enough for a new connection's handshakes at ``round_trip``."""
    return max(timeout, (CONNECT_ROUND_TRIPS + 1) * far(round_trip))


def http_timeouts(timeout: float, keepalive_time: float, round_trip: Optional[float] = None) -> tuple[float, float]:
    """(connect, read) seconds for an HTTP request: a host that does not accept the connection is noticed within
    one keepalive interval (plus ``CONNECT_ROUND_TRIPS`` x a measured ``round_trip``).

    Example::

        http_timeouts(30.0, 1.0)   # (1.0, 30.0)
    """
    connect = min(timeout, keepalive_time + CONNECT_ROUND_TRIPS * far(round_trip)) if keepalive_time > 0 else timeout
    return connect, timeout


def is_too_many_pings(details: str) -> bool:
    """True for a gRPC error caused by the server's GOAWAY ``too_many_pings`` (its ping policy)."""
    text = (details or "").lower()
    return TOO_MANY_PINGS in text or TOO_MANY_PINGS_ALT in text
