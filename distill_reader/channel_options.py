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

Example::

    options = grpc_channel_options(keepalive_time=1.0)            # ours: pings while a request is out
    grpc.insecure_channel("127.0.0.1:9292", options=options)
"""
from __future__ import annotations

DEFAULT_KEEPALIVE_TIME = 1.0          # s between pings while a request is out (0: off); also the ping timeout
DEFAULT_REQUEST_TIMEOUT = 30.0        # s a teacher has to answer one request (TeacherClient, the reader's workers)
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RECONNECT_BACKOFF_INTERVALS = 2       # first reconnect backoff (the connect timeout) in keepalive intervals
TOO_MANY_PINGS = "too many pings"     # how grpc-core reports a GOAWAY too_many_pings, lower case ...
TOO_MANY_PINGS_ALT = "too_many_pings"  # ... and its debug data


def grpc_channel_options(keepalive_time: float = 0.0,
                         max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """grpc channel options: message limits, and with ``keepalive_time`` > 0 pings while a request is out.

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
        interval_ms = int(keepalive_time * 1000)
        options += [("grpc.keepalive_time_ms", interval_ms), ("grpc.keepalive_timeout_ms", interval_ms),
                    ("grpc.http2.ping_timeout_ms", interval_ms), ("grpc.keepalive_permit_without_calls", 0),
                    ("grpc.http2.max_pings_without_data", 0),
                    ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_INTERVALS * interval_ms)]
    return options


def http_timeouts(timeout: float, keepalive_time: float) -> tuple[float, float]:
    """(connect, read) seconds for an HTTP request: a host that does not accept the connection is noticed within
    one keepalive interval.

    Example::

        http_timeouts(30.0, 1.0)   # (1.0, 30.0)
    """
    connect = min(timeout, keepalive_time) if keepalive_time > 0 else timeout
    return connect, timeout


def is_too_many_pings(details: str) -> bool:
    """True for a gRPC error caused by the server's GOAWAY ``too_many_pings`` (its ping policy)."""
    text = (details or "").lower()
    return TOO_MANY_PINGS in text or TOO_MANY_PINGS_ALT in text
