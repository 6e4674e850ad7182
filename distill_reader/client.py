"""Client for one teacher endpoint speaking the Paddle Serving protocol (gRPC by default, HTTP as an option).

Works against a real Paddle Serving 0.9 server (typed fields) and against ``teachers.serve`` (raw bytes in
``tensor_content``, the fast path). With ``wire="auto"`` the client asks the endpoint's standard gRPC health
service (HTTP: ``GET /health``) once: our server answers it, a real Paddle Serving server does not, so the
client falls back to typed fields there.

Example::

    client = TeacherClient("127.0.0.1:9292", "serving_client/serving_client_conf.prototxt")
    out = client.predict({"img": images}, fetch=["prediction"])   # {'prediction': array (N, 10)}
"""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence, Union

import grpc
import numpy as np
import requests
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distill_base.client_security import ClientSecurity
from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.serving_config import ServingConfig
from distill_base.serving_json import parse_response, request_to_json
from distill_base.status_codes import StatusClass, status_class
from distill_base.tensor_codec import TensorCodecError, decode_tensor, encode_tensor
from distill_base.wire_size import DEFAULT_ALLOWANCE, DecodedSizeError, check_decoded_size

from . import feeds as lod_feeds
from .channel_options import (
    DEFAULT_KEEPALIVE_TIME,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    FIRST_PROBE_TIMEOUT,
    far,
    grpc_channel_options,
    http_timeouts,
    is_link_timeout,
    is_too_many_pings,
    latest_round_trip,
    measure_tcp_round_trip,
    moved_longer,
    note_round_trip,
    probe_timeout_for,
    remeasure_round_trip,
    round_trip_moved,
    round_trip_of,
    time_handshakes,
)
from .feeds import FeedError, prepare_feed
from .padding import Padding, PadValue

logger = logging.getLogger(__name__)
PATH_PROBES = 2   # a new connection once this many latest round-trip probes agree that the link moved (each the
                  # least of its handshakes: channel_options.time_handshakes)

SERVICE_NAME = "baidu.paddle_serving.predictor.general_model.GeneralModelService"
HTTP_PATH = "/GeneralModelService/inference"


class TeacherError(RuntimeError):
    """A teacher request failed; ``endpoint`` names the teacher."""

    def __init__(self, endpoint: str, message: str):
        super().__init__(f"teacher {endpoint}: {message}")
        self.endpoint = endpoint


class TeacherUnavailable(TeacherError):
    """The teacher could not be reached or did not answer in time (worth retrying elsewhere)."""


class TeacherAnswerError(TeacherError):
    """The teacher answered with an error or with an answer that does not fit the request."""


class TeacherAuthError(TeacherError):
    """The teacher refused this client's credentials (gRPC UNAUTHENTICATED / PERMISSION_DENIED, HTTP 401 / 403):
    a missing or wrong bearer token, or a client certificate it does not accept."""


class TeacherTlsError(TeacherAuthError):
    """The TLS handshake with the teacher failed for a reason retrying cannot fix: its certificate is not signed
    by ``tls_ca``, it refused this client's certificate, or one side speaks TLS and the other does not (when the
    error says so; a plaintext client's connection closed by a TLS teacher only gets a hint)."""


class TeacherRequestRejected(TeacherAnswerError):
    """The teacher refused the request as invalid (err_no 5000, gRPC INVALID_ARGUMENT, HTTP 4xx): wrong feed,
    shape or dtype for the model it serves. Another teacher of the same model would refuse it too."""


_TRANSIENT_GRPC_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED)
_REJECTING_GRPC_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
_AUTH_GRPC_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class TeacherClient:
    """Send batched feeds to one teacher endpoint and get the fetch vars back as numpy arrays.

    Args:
        endpoint: ``host:port``.
        config: a ServingConfig, or the path of a serving client config file or folder.
        protocol: ``"grpc"`` or ``"http"``.
        wire: ``"auto"``, ``"raw"`` (tensor_content) or ``"typed"`` (real Paddle Serving's fields).
        http_format: ``"proto"`` (the real HttpClient's default) or ``"json"``, with protocol ``"http"``.
        timeout: seconds per request.
        compress: gzip HTTP request bodies over 512 bytes, as the real client does when asked.
        keepalive_time: gRPC keepalive ping interval in seconds while a request is out (0: off); a peer that
            does not answer a ping within the same time fails the request with UNAVAILABLE, so a frozen or
            partitioned teacher is noticed in about two intervals. Pings go only to a ``teachers.serve`` (known
            by its health service, whose ping policy permits them), never to other servers, whose policies
            answer them with GOAWAY ``too_many_pings`` (``distill_reader.channel_options``).
            HTTP: the connect timeout.
        security: TLS files and bearer token (``ClientSecurity``); default: ``tls_ca``/``tls_cert``/
            ``tls_key``/``token`` below, the token also from ``DISTILL_TEACHER_TOKEN``.
        tls_ca / tls_cert / tls_key: PEM files: the CA that signed the teacher's certificate (turns TLS on), and
            the client certificate and key for a teacher that requires them (mutual TLS).
        token: bearer token for a teacher started with ``--token_file``.
        pad_value: fill value for padded variable-length feeds: one number, or a dict feed -> number (feeds left
            out pad with 0); see ``distill_reader.padding``.
        lengths_feeds: padded feed -> feed that gets each sample's length (when the caller leaves it out; a
            given one must hold the lengths).

    Errors: ``TeacherUnavailable`` (transient: unreachable, timed out, overloaded, predictor failed, HTTP 5xx),
    ``TeacherRequestRejected`` (the request is invalid for the model), ``TeacherAnswerError`` (a wrong answer),
    ``TeacherAuthError`` (credentials refused);
    ``FeedError`` before sending when a feed does not fit the config; ``PaddingOptionError`` (a ValueError) at
    construction for a ``pad_value`` / ``lengths_feeds`` that does not fit the model.

    Fork safety: a client used in a child process after ``os.fork()`` opens connections of its own there (a new
    gRPC channel or HTTP session) and leaves the parent's alone; parent and child never share a socket.

    The connection is made at the first request, or beforehand with ``connect()`` (``ready_to_send()`` says
    whether it is made): the round trip timed while the health check's connection is made, the check (the wire
    form; is it a ``teachers.serve``, whose ping policy permits pings?) while a channel with pings fitted to the
    round trip connects beside it, that channel used for a ``teachers.serve`` (about 2-3 round trips once).

    Variable-length feeds and fetches (LoD or padded, see ``distill_reader.feeds``): a feed takes a list of
    per-sample arrays or Paddle Serving's ``{"words": rows, "words.lod": offsets}``; ``predict(...,
    lod_form="split")`` gives LoD/per-token fetches back as a list of per-sample arrays, ``"serving"`` as the
    rows plus ``"<name>.lod"``.
    """

    def __init__(self, endpoint: str, config: Union[ServingConfig, str], protocol: str = "grpc",
                 wire: str = "auto", http_format: str = "proto", timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, compress: bool = False,
                 keepalive_time: float = DEFAULT_KEEPALIVE_TIME, security: Optional[ClientSecurity] = None,
                 tls_ca: Optional[str] = None, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 token: Optional[str] = None, pad_value: PadValue = 0,
                 lengths_feeds: Optional[Mapping[str, str]] = None):
        """Check the arguments.

        Raises:
            ValueError: ``protocol``, ``wire`` or ``http_format`` is not one of its values.
            ConfigError: ``config`` is a path that is not a valid serving config.
            PaddingOptionError: ``pad_value``/``lengths_feeds`` do not fit the config.
        """
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
        if wire not in ("auto", "raw", "typed"):
            raise ValueError(f"wire must be 'auto', 'raw' or 'typed', not {wire!r}")
        if http_format not in ("proto", "json"):
            raise ValueError(f"http_format must be 'proto' or 'json', not {http_format!r}")
        self.endpoint = endpoint
        self.config = config if isinstance(config, ServingConfig) else ServingConfig.load(config)
        self.protocol = protocol
        self.http_format = http_format
        self.timeout = timeout
        self.compress = compress
        self.keepalive_time = keepalive_time
        self.security = security or ClientSecurity.create(tls_ca, tls_cert, tls_key, token)
        padding = Padding.create(pad_value, lengths_feeds)
        padding.check_config(self.config)
        self.pad_value, self.lengths_feeds = padding.pad_value, dict(padding.lengths_feeds)
        self.max_message_bytes = max_message_bytes
        self.max_decoded_allowance = DEFAULT_ALLOWANCE   # answers: see _read_answer
        self._raw: Optional[bool] = {"auto": None, "raw": True, "typed": False}[wire]
        self._ours: Optional[bool] = None          # a teachers.serve (health service answers)? None: not asked yet
        self._pings_refused = False                 # GOAWAY too_many_pings seen: no pings to this endpoint
        self._log_id = 0
        self._channel: Optional[grpc.Channel] = None
        self._session: Optional[requests.Session] = None
        self._pid = os.getpid()
        self._forked = False                        # this process is a fork of the one that made the client
        self._lock = threading.Lock()               # connection changes (request threads share a client)
        self._refit_lock = threading.Lock()         # one round-trip measurement at a time (_refit_to_longer_link)
        self._pending: Optional[tuple] = None       # (channel, keepalive, round trip) being connected
        self._early: Optional[tuple] = None         # the same, with pings, opened while the first check runs
        # per request, not on the session: requests lets $REQUESTS_CA_BUNDLE override a session's verify
        self._tls_options = self.security.requests_options() if protocol == "http" else {}
        self._connect(keepalive=False)

    @property
    def keepalive_active(self) -> bool:
        """True while this client's gRPC channel sends keepalive pings (to a teachers.serve only)."""
        return self._channel_keepalive > 0

    def _connect(self, keepalive: bool) -> None:
        """Open this process's connection: a gRPC channel (with pings when ``keepalive``) or an HTTP session."""
        self._drop_pending()
        if self.protocol == "grpc":
            self._use_channel(*self._open_channel(keepalive, far(round_trip_of(self.endpoint))))
        else:
            self._channel_keepalive = 0.0
            self._session = requests.Session()
            self._session.headers.update(self.security.http_headers())
        self._pid = os.getpid()   # last: other threads of a child use the new connection once they see it

    def _open_channel(self, keepalive: bool, round_trip: float, fresh: bool = False) -> tuple:
        """A gRPC channel whose keepalive timeouts fit ``round_trip`` (s, 0 = near); ``fresh``: on a TCP
        connection of its own (grpc-core's global subchannel pool would hand back the current one when the options
        match). Returns (channel, keepalive seconds, round trip)."""
        forked = self._pid != os.getpid() or self._forked
        keepalive_time = self.keepalive_time if keepalive else 0.0
        options = grpc_channel_options(keepalive_time, self.max_message_bytes, round_trip=round_trip)
        if forked or fresh:   # (a forked child: the parent's inherited connection)
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._forked = forked
        return self.security.grpc_channel(self.endpoint, options), keepalive_time, round_trip

    def _use_channel(self, channel: Any, keepalive_time: float, round_trip: float) -> None:
        self._channel, self._stub = channel, _RawAnswerStub(channel)
        self._channel_keepalive, self._channel_round_trip = keepalive_time, round_trip

    def _reconnect(self, keepalive: bool) -> None:
        """A new gRPC channel. The old one is not closed (other threads' calls may be on it): grpc closes it
        when they are done and it is collected."""
        self._connect(keepalive)

    def _reconnect_when_ready(self, round_trip: float) -> None:
        """A new connection for a link whose round trip is now ``round_trip`` (s), used once it is connected:
        until then requests stay on the current one (a new connection over a 300 ms link takes 2 round trips
        before it carries a request; switching at once left the reorder buffer waiting ~1 s). Called with
        ``_lock`` held."""
        self._drop_pending()
        opened = self._open_channel(bool(self._channel_keepalive), round_trip, fresh=True)
        channel = opened[0]
        self._pending = opened

        def connected(state: grpc.ChannelConnectivity) -> None:
            if state is not grpc.ChannelConnectivity.READY:
                return
            with self._lock:
                if self._pending is opened:
                    self._pending = None
                    self._use_channel(*opened)
            channel.unsubscribe(connected)

        channel.subscribe(connected, try_to_connect=True)   # (grpc calls back from a thread of its own)

    def _open_early_channel_with_pings(self) -> None:
        """While the first health check runs (is it a teachers.serve?): a channel with pings, fitted to the round
        trip just timed, starts connecting, so that its TCP and HTTP/2 handshakes overlap the check's round trip
        instead of following it (2 round trips of the first request: 3 s 1.5 s away; issue 25). Used if the check
        says teachers.serve; closed unused otherwise, no ping sent (pings go only while a call is out)."""
        if self._early is not None or not self._keepalive_undecided() or self._ours is False:
            return
        self._early = self._open_channel(True, far(round_trip_of(self.endpoint)))
        _start_connecting(self._early[0])

    def _drop_early(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            early[0].close()

    def _drop_pending(self) -> None:
        """Forget a connection still being made for a link change (a newer one, or an immediate one, replaces it);
        closing its channel also drops its connectivity callback."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[0].close()

    def _own_connection(self) -> None:
        """In a child process after ``os.fork()``: connections of its own; the parent's are left alone.

        The inherited channel or session is dropped without closing it (closing could shut the socket down for
        the parent too); ``_INHERITED`` keeps it from being collected in the child.
        """
        if self._pid == os.getpid():
            return
        with _FORK_LOCK:   # this client's lock may have been held by a parent thread at the fork: a new one
            if self._pid != os.getpid():
                self._lock = threading.Lock()
                self._refit_lock = threading.Lock()
                self._reconnect_in_child()

    def _reconnect_in_child(self) -> None:
        logger.info("teacher %s: client used in a forked child (pid %d): opening its own connection",
                    self.endpoint, os.getpid())
        _INHERITED.append(self._channel if self.protocol == "grpc" else self._session)
        for opened in (self._pending, self._early):   # the parent's, being connected: left to it
            if opened is not None:
                _INHERITED.append(opened[0])
        self._pending = self._early = None
        self._connect(keepalive=False)
        self._ours = None   # asked again on this connection (and pings turned on again for teachers.serve)

    def _keepalive_undecided(self) -> bool:
        """True while this client may still turn keepalive pings on (gRPC, pings wanted and not refused, none yet)
        and does not know yet whether the server permits them or the round trip to fit them to."""
        if self.protocol != "grpc" or self.keepalive_time <= 0 or self._pings_refused or self._channel_keepalive:
            return False
        return self._ours is None or round_trip_of(self.endpoint) is None or bool(self._ours)

    def _use_keepalive_if_ours(self) -> None:
        """Turn keepalive pings on once the endpoint is known to be a teachers.serve (its ping policy permits
        them); other servers never get pings (their default policies answer GOAWAY too_many_pings)."""
        if not self._keepalive_undecided():
            return
        if self._ours is None or round_trip_of(self.endpoint) is None:
            self._first_probe()
        with self._lock:
            early, self._early = self._early, None
            if self._ours and not self._channel_keepalive and not self._pings_refused:
                if early is None:
                    self._reconnect(keepalive=True)
                    _start_connecting(self._channel)
                else:
                    self._drop_pending()
                    self._use_channel(*early)
            elif early is not None:
                early[0].close()

    # -- public API ------------------------------------------------------------------------------------
    def ready_to_send(self) -> bool:
        """True when this process's connection is made: a request goes out at once (``connect`` has nothing to
        do). Never blocks."""
        if self._pid != os.getpid() or self._raw is None:
            return False
        return not self._keepalive_undecided()

    def connect(self) -> None:
        """Make this process's connection ready for requests now, as ``predict`` would first: the first health
        check (the wire form; is it a teachers.serve?), with the round trip timed when unknown, and for a
        teachers.serve a channel with keepalive pings fitted to that round trip, connected (READY: its TCP and
        HTTP/2 handshakes made while the check ran). About 2-3 round trips once, then nothing; each step has its
        own timeout (``FIRST_PROBE_TIMEOUT`` grown with the round trip, at most the request timeout). A caller that
        times requests calls it first, so its latencies hold no handshake (the reader's workers; 1.5 s away the
        first answers came ~10 s from the start, ~15 s when the channel with pings was connected after the check
        by the first request). No health check is sent on the channel with pings: one timed out at 6 s behind
        the cold connection's first requests 1.5 s away.

        Raises:
            TeacherError: as ``predict`` (TeacherUnavailable: no answer, not serving; TLS or credentials refused).
        """
        self._own_connection()
        self._wire_is_raw()
        self._use_keepalive_if_ours()
        self._wait_until_connected()

    def _wait_until_connected(self) -> None:
        """Wait for the channel with pings to be connected (READY: its TCP and HTTP/2 handshakes done), at most
        the first probe's timeout for the round trip; a channel that fails to connect is left to the request,
        which reports it."""
        if self.protocol != "grpc" or not self._channel_keepalive:
            return
        _wait_until_settled(self._channel, min(self.timeout, probe_timeout_for(FIRST_PROBE_TIMEOUT,
                                                                               round_trip_of(self.endpoint))))

    def predict(self, feeds: Mapping[str, Any], fetch: Optional[Sequence[str]] = None,
                batch_size: Optional[int] = None, lod_form: str = "split",
                timing: Optional[dict] = None) -> dict[str, Any]:
        """Run the teacher on a batch. ``feeds`` maps feed aliases to arrays whose first dim is the batch
        (variable-length feeds: see the class doc). ``timing``: a dict that gets ``server_seconds``, the time the
        request spent at the server by its own clock (Paddle Serving's ``profile_server`` / ``profile_time``: the
        span of the answer's timestamps, us; None when the server sent none), the rest of the latency being the
        network's.

        Raises:
            FeedError: a feed is missing or does not fit the config (dtype, shape, a bad variable-length feed); nothing
                is sent.
            ValueError: ``lod_form`` is not ``split`` or ``serving``.
            TeacherError: the teacher's failure, by class: TeacherUnavailable (down, slow, busy, sick),
                TeacherRequestRejected (it refused the request as invalid), TeacherAnswerError (an unusable answer),
                TeacherAuthError / TeacherTlsError (refused credentials, TLS mismatch).
        """
        fetch = list(fetch) if fetch is not None else self.config.fetch_names
        lod_feeds.check_lod_form(lod_form)
        self._own_connection()
        try:
            variable = lod_feeds.prepare_variable_feeds(self.config, feeds, self.pad_value, self.lengths_feeds)
        except lod_feeds.VariableFeedError as exc:
            raise FeedError(str(exc)) from None
        self._check_names(variable.feeds, fetch)      # before guessing the batch size from the feeds given
        if batch_size is None:
            batch_size = variable.batch_size or _batch_size_of(variable.feeds)
        request = self._encode_request(variable.feeds, fetch, batch_size, variable.lods)
        request.profile_server = timing is not None
        self._use_keepalive_if_ours()
        response = self._call_grpc(request) if self.protocol == "grpc" else self._call_http(request)
        if timing is not None:
            timing["server_seconds"] = _server_seconds(response)
        return self._outputs(response, fetch, batch_size, variable, lod_form)

    def build_request(self, feeds: Mapping[str, Any], fetch: Sequence[str], batch_size: int,
                      lods: Optional[Mapping[str, Sequence[int]]] = None) -> service_pb2.Request:
        """The Request message for ``feeds``; unknown feed or fetch names raise naming the model's names."""
        self._check_names(feeds, fetch)
        return self._encode_request(feeds, fetch, batch_size, lods)

    def _encode_request(self, feeds: Mapping[str, Any], fetch: Sequence[str], batch_size: int,
                        lods: Optional[Mapping[str, Sequence[int]]] = None) -> service_pb2.Request:
        raw = self._wire_is_raw()
        self._log_id += 1
        request = service_pb2.Request(fetch_var_names=list(fetch), log_id=self._log_id)
        for name, value in feeds.items():
            spec = self.config.feed(name)
            array = prepare_feed(spec, value, batch_size)
            encode_tensor(array, name=spec.name, alias_name=spec.alias_name, raw=raw, out=request.tensor.add(),
                          lod=(lods or {}).get(name))
        return request

    def _check_names(self, feeds: Mapping[str, Any], fetch: Sequence[str]) -> None:
        for name in fetch:
            self.config.fetch(name)
        missing = [s.alias_name for s in self.config.feeds if s.alias_name not in feeds]
        if missing:
            raise FeedError(f"missing feed(s) {missing} for teacher {self.endpoint}; "
                            f"the model's feeds are {self.config.feed_names}")

    def health(self, timeout: float = 1.0) -> bool:
        """True when the endpoint answers its health check with SERVING.

        The timeout grows to cover a new connection at the endpoint's measured round trip (a TCP handshake
        timed first when none is known); the check's round trip is noted, and a keepalive channel whose
        timeouts no longer fit the round trip is replaced (distill_reader.channel_options).
        """
        self._own_connection()
        if round_trip_of(self.endpoint) is None:
            measure_tcp_round_trip(self.endpoint, timeout)
        timeout = probe_timeout_for(timeout, round_trip_of(self.endpoint))
        start = time.monotonic()
        try:
            healthy = self._probe(timeout) is not None
        except TeacherError:
            remeasure_round_trip(self.endpoint, timeout)   # a link that became far: the next probe fits it
            return False
        note_round_trip(self.endpoint, time.monotonic() - start)
        self._follow_round_trip()
        return healthy

    def network_round_trip(self, timeout: float = 1.0, handshakes: int = 1) -> Optional[float]:
        """The network's round trip to the teacher now: the least of ``handshakes`` TCP handshakes timed at once
        (seconds, also noted; ``channel_options.time_handshakes``), or None (none answered within ``timeout``, not
        ``host:port``). Answered by the teacher's kernel on connections of their own, they are not held up behind
        this client's requests, as a health check on a connection busy with a far teacher's window of requests
        is (0.3 s read 0.6-7 s; issue 25). A keepalive channel whose timeouts no longer fit is replaced."""
        self._own_connection()
        round_trip = time_handshakes(self.endpoint, handshakes, timeout)
        if round_trip is not None:
            self._follow_round_trip()
        return round_trip

    def round_trip_measured(self, seconds: float) -> None:
        """A network round trip to the teacher measured elsewhere (seconds; e.g. another worker process's link
        probe), noted as if this client had timed it: its connection follows a link that moved as after
        ``network_round_trip``, once the latest ``PATH_PROBES`` measurements agree.

        Example::

            client.round_trip_measured(0.3)   # the link is now 300 ms long, as another process measured
        """
        self._own_connection()
        note_round_trip(self.endpoint, seconds)
        self._follow_round_trip()

    def _follow_round_trip(self) -> None:
        """A new connection when the link's round trip moved far from the one the current one was made over
        (``round_trip_moved``; ``PATH_PROBES`` probes agree): its keepalive timeouts, and the kernel's congestion
        state, fit the old link.

        TCP learns its path once: BBR (Linux's default on many hosts) sizes its window from the least round trip
        of the last 10 s, so a link that slows from 1 ms to 300 ms carries ~2 x bandwidth x 1 ms for 10 s (a far
        teacher at 0.7 of its throughput; 0.6 answers/s at 1.5 s, where a new connection ramps in ~6 round
        trips); CUBIC's retransmission timeout, fitted for 1 ms, fires spuriously and collapses its window. The
        new connection starts over on the new link; requests already out finish on the old one (issue 25)."""
        if self.protocol != "grpc" or not self.ready_to_send():
            return   # (no connection yet, or the first one being made: it is fitted to the round trip noted)
        latest = latest_round_trip(self.endpoint, PATH_PROBES)
        if latest is None:
            return
        now = far(latest)
        with self._lock:
            target = self._pending[2] if self._pending is not None else self._channel_round_trip
            if round_trip_moved(now, target):
                logger.info("teacher %s: round trip %.3fs (connection made for %.3fs): new connection to fit it",
                            self.endpoint, now, self._channel_round_trip)
                self._reconnect_when_ready(now)

    def close(self) -> None:
        if self._pid != os.getpid():
            return   # the parent's connection, inherited through fork: not this process's to close
        with self._lock:
            self._drop_pending()
            self._drop_early()
        if self._channel is not None:
            self._channel.close()
        if self._session is not None:
            self._session.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TeacherClient({self.endpoint!r}, protocol={self.protocol!r})"

    # -- wire form -----------------------------------------------------------------------------------
    def _wire_is_raw(self) -> bool:
        if self._raw is None:
            self._own_connection()
            probed = self._first_probe()
            if probed is None:  # draining or starting: not a wire-form answer, ask again next time
                raise TeacherUnavailable(self.endpoint, "health check answers NOT_SERVING")
            self._raw = probed
            logger.debug("teacher %s: %s wire form", self.endpoint, "raw" if self._raw else "typed")
        return self._raw

    def _first_probe(self) -> Optional[bool]:
        """``_probe`` on a fresh connection, before its first request: the round trip measured first when unknown
        (one TCP handshake), the check bounded by ``FIRST_PROBE_TIMEOUT`` grown for that round trip (not by
        ``request_timeout``: a frozen teacher would hold the request that long on a channel without pings)."""
        if self.protocol == "grpc":
            _start_connecting(self._channel)   # the check's connection: its handshake beside the one timed
        if round_trip_of(self.endpoint) is None:
            measure_tcp_round_trip(self.endpoint, min(self.timeout, FIRST_PROBE_TIMEOUT))
        if self.protocol == "grpc":
            with self._lock:
                if not self._channel_keepalive:   # being connected over the link as it is: fits it (no pings)
                    self._channel_round_trip = far(round_trip_of(self.endpoint))
                self._open_early_channel_with_pings()
        start = time.monotonic()
        timeout = min(self.timeout, probe_timeout_for(FIRST_PROBE_TIMEOUT, round_trip_of(self.endpoint)))
        try:
            probed = self._probe(timeout, first=True)
        finally:
            if not self._ours:   # not a teachers.serve (or no answer): no pings, no use for it
                with self._lock:
                    self._drop_early()
        if round_trip_of(self.endpoint) is None:   # an upper bound (a new connection's handshakes too)
            note_round_trip(self.endpoint, time.monotonic() - start)
        return probed

    def _probe(self, timeout: float, first: bool = False) -> Optional[bool]:
        """True: our server (raw ok); False: a server without our health service (typed); None: not serving.

        ``first``: the first check on a new connection; no answer within ``timeout`` then says so (a frozen or
        overloaded server whose kernel still accepts connections), not a bare gRPC DEADLINE_EXCEEDED."""
        if self.protocol == "grpc":
            stub = health_pb2_grpc.HealthStub(self._channel)
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._ours = False
                    return False
                if first and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TeacherUnavailable(self.endpoint, f"no answer to the first health check on a new "
                                                            f"connection within {timeout:g}s (gRPC DEADLINE_EXCEEDED: "
                                                            f"a frozen or overloaded server, its kernel still "
                                                            f"accepting connections)") from None
                raise self._tls_verdict(_grpc_error(self.endpoint, exc)) from None
            self._ours = True
            return True if answer.status == health_pb2.HealthCheckResponse.SERVING else None
        try:
            answer = self._session.get(f"{self.security.scheme}://{self.endpoint}/health", timeout=timeout,
                                       **self._tls_options)
        except requests.RequestException as exc:
            raise self._tls_verdict(_http_error(self.endpoint, exc, "HTTP health check")) from exc
        if answer.status_code == 404:
            return False
        return True if answer.status_code == 200 else None

    def _tls_verdict(self, error: TeacherError) -> TeacherError:
        """A connection the teacher closed, as a TLS mismatch or a refused client certificate would: one TLS
        handshake of our own tells (TeacherTlsError, retrying cannot help); otherwise ``error`` as it is, with a
        hint to check the TLS options only when this client speaks TLS (a plaintext client's probe already found
        that the teacher does not serve TLS: a teacher that died or closed the connection gets no TLS hint)."""
        if not isinstance(error, TeacherUnavailable) or not _tls_symptom(str(error)):
            return error
        reason = self.security.tls_refusal(self.endpoint, timeout=min(2.0, self.timeout))
        if reason:
            return TeacherTlsError(self.endpoint, f"{reason} ({error})")
        if self.security.tls:
            return TeacherUnavailable(self.endpoint, str(error).split(": ", 1)[-1] + _TLS_HINT)
        return error

    # -- transports ----------------------------------------------------------------------------------
    def _call_grpc(self, request: service_pb2.Request) -> service_pb2.Response:
        stub, pinging = self._stub, self._channel_keepalive
        try:
            answer = stub.inference(request, timeout=self.timeout, metadata=self.security.metadata())
        except grpc.RpcError as exc:
            unavailable = pinging and exc.code() == grpc.StatusCode.UNAVAILABLE
            if unavailable and is_link_timeout(exc.details()) and self._refit_to_longer_link(stub):
                return self._call_grpc_again(request)
            if not (unavailable and is_too_many_pings(exc.details())):
                raise self._tls_verdict(_grpc_error(self.endpoint, exc)) from None
        else:
            return self._read_answer(answer, "gRPC")
        # the server (or a proxy in between) refuses our pings: none to this endpoint from now on, and the
        # request once more at once on a fresh connection; the teacher is not to blame
        with self._lock:
            if self._channel_keepalive:
                logger.warning("teacher %s: GOAWAY too_many_pings (its ping policy refuses keepalive pings every "
                               "%gs): keepalive off for it; request retried", self.endpoint, pinging)
                self._pings_refused = True
                self._reconnect(keepalive=False)
        try:
            answer = self._stub.inference(request, timeout=self.timeout, metadata=self.security.metadata())
        except grpc.RpcError as exc:
            raise self._tls_verdict(_grpc_error(self.endpoint, exc)) from None
        return self._read_answer(answer, "gRPC")

    def _call_grpc_again(self, request: service_pb2.Request) -> service_pb2.Response:
        """The request once more on the current channel (no further retry)."""
        try:
            answer = self._stub.inference(request, timeout=self.timeout, metadata=self.security.metadata())
        except grpc.RpcError as exc:
            raise self._tls_verdict(_grpc_error(self.endpoint, exc)) from None
        return self._read_answer(answer, "gRPC")

    def _refit_to_longer_link(self, stub: Any) -> bool:
        """A pinging connection (``stub``'s) died of a link timeout: True when the link has become longer than its
        timeouts were set for and a new connection fits it (the request is then sent again: the teacher is not to
        blame). grpc-core makes the keepalive timeout the socket's TCP_USER_TIMEOUT, so a connection made while a
        teacher was near is cut as soon as its link slows past that, before any probe could measure it there:
        one TCP handshake is timed instead (``remeasure_round_trip``; at most ``FIRST_PROBE_TIMEOUT``; no answer:
        a black hole, the error stands). One thread measures; the others retry on the connection it made."""
        with self._refit_lock:
            if self._stub is not stub:       # another request thread already re-made it
                return bool(self._channel_keepalive)
            then = self._channel_round_trip
            now = remeasure_round_trip(self.endpoint, min(self.timeout, FIRST_PROBE_TIMEOUT), fitted_for=then,
                                       longer_only=True)
            if now is None or not moved_longer(now, then):
                return False
            with self._lock:
                if self._stub is stub and self._channel_keepalive:
                    logger.info("teacher %s: connection cut by its keepalive timeout; round trip now %.3fs (was "
                                "%.3fs): new connection with timeouts to match, request sent again",
                                self.endpoint, now, then)
                    self._reconnect(keepalive=True)
            return bool(self._channel_keepalive)

    def _read_answer(self, body: bytes, how: str) -> service_pb2.Response:
        """A teacher's serialized Response, after bounding what parsing it costs (``distill_base.wire_size``:
        typed values over max(body + 64 KiB, ``max_decoded_allowance``) once decoded); TeacherAnswerError else."""
        try:
            check_decoded_size(body, "response", self.max_decoded_allowance)
            response = service_pb2.Response()
            response.ParseFromString(body)
        except (DecodedSizeError, DecodeError) as exc:
            raise TeacherAnswerError(self.endpoint, f"{how} answer of {len(body)} bytes refused: {exc}") from None
        return response

    def _call_http(self, request: service_pb2.Request) -> service_pb2.Response:
        if self.http_format == "json":
            body = json.dumps(request_to_json(request)).encode()
            headers = {"Content-Type": "application/json"}
        else:
            body = request.SerializeToString()
            headers = {"Content-Type": "application/proto"}
        if self.compress and len(body) > 512:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        headers["Accept-Encoding"] = "gzip"
        url = f"{self.security.scheme}://{self.endpoint}{HTTP_PATH}"
        try:
            answer = self._session.post(url, data=body, headers=headers, timeout=self._http_timeouts(),
                                        **self._tls_options)
        except requests.Timeout as exc:
            raise TeacherUnavailable(self.endpoint, f"no answer within {self.timeout}s") from exc
        except requests.RequestException as exc:
            raise self._tls_verdict(_http_error(self.endpoint, exc, "HTTP request")) from exc
        if answer.status_code >= 500:
            raise TeacherUnavailable(self.endpoint, f"HTTP {answer.status_code}: {answer.text[:200]}")
        if answer.status_code in (401, 403):
            raise TeacherAuthError(self.endpoint, f"HTTP {answer.status_code}: {answer.text[:200]}")
        if answer.status_code >= 400:
            raise TeacherRequestRejected(self.endpoint, f"HTTP {answer.status_code}: {answer.text[:200]}")
        if not answer.headers.get("Content-Type", "").startswith("application/json"):
            return self._read_answer(answer.content, f"HTTP {answer.status_code}")
        try:
            response = parse_response(answer.content)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad answer
            raise TeacherAnswerError(self.endpoint, f"HTTP {answer.status_code}, unreadable body: "
                                                    f"{answer.content[:200]!r} ({exc})") from exc
        return response

    def _http_timeouts(self) -> tuple[float, float]:
        """(connect, read) seconds: a host that does not accept the connection is noticed quickly."""
        return http_timeouts(self.timeout, self.keepalive_time, round_trip_of(self.endpoint))

    def _outputs(self, response: service_pb2.Response, fetch: Sequence[str], batch_size: int,
                 variable: Optional[lod_feeds.VariableFeeds] = None, lod_form: str = "split") -> dict[str, Any]:
        if response.err_no != 0:
            raise _err_no_error(self.endpoint, response.err_no, response.err_msg)
        if not response.outputs:
            raise TeacherAnswerError(self.endpoint, "answer has no outputs")
        by_name: dict[str, np.ndarray] = {}
        lods: dict[str, list] = {}
        for tensor in response.outputs[0].tensor:
            try:
                array = decode_tensor(tensor)
            except TensorCodecError as exc:
                raise TeacherAnswerError(self.endpoint, str(exc)) from None
            by_name[tensor.alias_name or tensor.name] = array
            by_name.setdefault(tensor.name, array)
            lods[tensor.alias_name or tensor.name] = lods[tensor.name] = list(tensor.lod)
        result = {}
        for name in fetch:
            spec = self.config.fetch(name)
            array = by_name.get(spec.alias_name, by_name.get(spec.name))
            if array is None:
                raise TeacherAnswerError(self.endpoint, f"answer lacks fetch {name!r} "
                                                        f"(it has {sorted(by_name)})")
            if not spec.is_lod_tensor and (array.ndim == 0 or array.shape[0] != batch_size):
                raise TeacherAnswerError(self.endpoint, f"fetch {name!r} has shape {list(array.shape)}, "
                                                        f"expected a batch of {batch_size}")
            result[name] = array
        try:
            return lod_feeds.shape_fetches(self.config, result, lods, variable or lod_feeds.VariableFeeds({}),
                                           batch_size, lod_form)
        except ValueError as exc:
            raise TeacherAnswerError(self.endpoint, str(exc)) from None


def _server_seconds(response: service_pb2.Response) -> Optional[float]:
    """The span of a Response's ``profile_time`` (the server's timestamps, us) in seconds, or None (none, or a span
    that cannot be one request's: negative or over an hour)."""
    stamps = response.profile_time
    if len(stamps) < 2:
        return None
    span = (max(stamps) - min(stamps)) / 1e6
    return span if 0.0 <= span <= 3600.0 else None


# What the client raises for each class of Paddle Serving's err_no (the table: distill_base/status_codes.py).
_ERROR_OF_CLASS: dict[StatusClass, type[TeacherError]] = {
    StatusClass.INVALID_INPUT: TeacherRequestRejected,   # any teacher of this model refuses it
    StatusClass.BUSY: TeacherUnavailable,                # elsewhere, and the teacher counts as slow or sick
    StatusClass.SICK: TeacherUnavailable,
    StatusClass.BROKEN: TeacherAnswerError,
}


def _err_no_error(endpoint: str, err_no: int, err_msg: str) -> TeacherError:
    """The exception for a non-zero ``err_no``, chosen by its class (``status_codes.status_class``)."""
    klass = status_class(err_no)
    return _ERROR_OF_CLASS[klass](endpoint, f"err_no {err_no} ({klass.value}): {err_msg}")


# Connections inherited through fork and replaced in the child: kept referenced so that the child never closes
# (or shuts down) the parent's sockets while collecting them.
_INHERITED: list[Any] = []
_FORK_LOCK = threading.Lock()   # serializes a child's first uses of its clients; new in every child


# gRPC connects a channel at its first call. To connect one sooner, and to wait for it, the reader asks the channel's
# core directly (grpc-core's connectivity state, grpc_connectivity_state: 0 idle, 1 connecting, 2 ready, 3
# transient failure, 4 shutdown) rather than by Channel.subscribe: grpc's polling thread behind subscribe raises in
# the background ("Channel closed!") when the channel is closed while it polls, which a first health check's
# channels often are. ``Channel._channel`` is grpc's own (grpc 1.74-1.78, setup.py's range); without it a channel
# connects at its first call, as before.
_READY, _SETTLED = 2, (2, 3, 4)


def _core_channel(channel: Any) -> Any:
    core = getattr(channel, "_channel", None)
    core = getattr(core, "_channel", core)   # an intercepted channel wraps a grpc Channel
    return core if hasattr(core, "check_connectivity_state") and hasattr(core, "watch_connectivity_state") else None


def _start_connecting(channel: Any) -> None:
    """Make ``channel`` connect now rather than at its first call; never blocks."""
    core = _core_channel(channel)
    if core is not None:
        with contextlib.suppress(ValueError):   # closed meanwhile
            core.check_connectivity_state(True)


def _wait_until_settled(channel: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``channel`` to be connected (or to fail to): True when it is READY."""
    core = _core_channel(channel)
    if core is None:
        return False
    deadline = time.time() + timeout
    try:
        state = core.check_connectivity_state(True)
        while state not in _SETTLED and time.time() < deadline:
            core.watch_connectivity_state(state, min(deadline, time.time() + 0.2))
            state = core.check_connectivity_state(False)
    except ValueError:   # closed meanwhile
        return False
    return state == _READY


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_fork_lock)


def _batch_size_of(feeds: Mapping[str, Any]) -> int:
    for value in feeds.values():
        shape = np.shape(value)
        if shape:
            return int(shape[0])
    raise FeedError("cannot tell the batch size: no feed has a batch dimension; pass batch_size=")


_TLS_SYMPTOMS = ("socket closed", "handshake", "ssl", "certificate", "remotedisconnected", "connection reset")


# What OpenSSL/BoringSSL (gRPC, requests) say when the handshake fails for good, lower case: a certificate not
# signed by the CA given, a client certificate refused or missing, TLS spoken to a plaintext port.
_TLS_REFUSALS = ("certificate_verify_failed", "certificate verify failed", "certificate_required",
                 "certificate required", "bad_certificate", "bad certificate", "unknown_ca", "unknown ca",
                 "wrong_version_number", "wrong version number")


def _tls_refusal(details: str) -> bool:
    return any(marker in (details or "").lower() for marker in _TLS_REFUSALS)


_TLS_HINT = (" (if this teacher serves TLS or requires a client certificate, check tls_ca / tls_cert / tls_key: "
             "a TLS mismatch looks like this)")


def _tls_symptom(details: str) -> bool:
    """True for errors that TLS on one side only, or a refused client certificate, look like (and that a teacher
    dying mid-request also gives: ``_tls_verdict`` tells them apart)."""
    return any(symptom in (details or "").lower() for symptom in _TLS_SYMPTOMS)


def _http_error(endpoint: str, exc: requests.RequestException, what: str) -> TeacherError:
    """A failed HTTP exchange: TeacherTlsError when TLS refused it for good, else TeacherUnavailable."""
    details = str(exc)
    if _tls_refusal(details):
        return TeacherTlsError(endpoint, f"{what}: TLS handshake failed: {details}{_TLS_HINT}")
    return TeacherUnavailable(endpoint, f"{what} failed: {details}")


class _RawAnswerStub:
    """GeneralModelService's inference rpc with the answer kept as bytes: ``TeacherClient._read_answer`` bounds
    what parsing it costs before protobuf parses it."""

    def __init__(self, channel: grpc.Channel):
        self.inference = channel.unary_unary(f"/{SERVICE_NAME}/inference",
                                             request_serializer=service_pb2.Request.SerializeToString,
                                             response_deserializer=None)


def _grpc_error(endpoint: str, exc: grpc.RpcError) -> TeacherError:
    """Transient codes -> TeacherUnavailable; invalid-request codes -> TeacherRequestRejected; the rest (e.g.
    UNIMPLEMENTED: not a Paddle Serving endpoint) -> TeacherAnswerError."""
    code = exc.code()
    details = exc.details()
    if _tls_refusal(details):
        return TeacherTlsError(endpoint, f"gRPC {code.name}: TLS handshake failed: {details}{_TLS_HINT}")
    if code in _TRANSIENT_GRPC_CODES:
        return TeacherUnavailable(endpoint, f"gRPC {code.name}: {details}")
    if code in _REJECTING_GRPC_CODES:
        return TeacherRequestRejected(endpoint, f"gRPC {code.name}: {details}")
    if code in _AUTH_GRPC_CODES:
        return TeacherAuthError(endpoint, f"gRPC {code.name}: {details}")
    return TeacherAnswerError(endpoint, f"gRPC {code.name}: {details}")
