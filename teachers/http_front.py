"""HTTP side of the teacher server (Paddle Serving 0.9's HTTP protocol) on aiohttp, in the server's event loop.

- ``POST /GeneralModelService/inference`` (also ``/debug``): a body with ``Content-Type: application/proto`` is a
  serialized Request (the real HttpClient's default); any other body is parsed as JSON whatever its content type
  (brpc does the same: Paddle Serving's curl examples send curl's form content type), proto field names,
  unnamed tensors matched to the feeds by position. JSON requests get JSON answers, errors included, with the
  field types Paddle Serving writes (64-bit integers as JSON numbers, ``err_no``/``err_msg``/``log_id`` always
  present). ``Content-Encoding: gzip`` bodies are inflated (never past ``max_body_size``); answers of 512 bytes
  or more are gzipped when ``Accept-Encoding`` allows.
- ``GET /health``: 200 ``{"status": "SERVING"}`` (503 ``NOT_SERVING`` while draining or while a predictor is wedged).
- ``GET /metrics``: Prometheus text, when the front was given ``TeacherMetrics``.

Bounds: no body is read past ``max_body_size`` whatever its headers say (a longer Content-Length gets 413 unread; a
chunked body is cut off at the limit; invalid or negative lengths get aiohttp's 400); at most ``max_connections``
connections (more are answered 503 and closed at once, so HTTP clients can never use up the process's files);
a connection that sends no complete request header within ``keepalive_timeout`` seconds (first request or between
requests) is closed; a body must arrive within ``body_timeout`` seconds; a request still in progress after
``request_timeout`` seconds (a client that does not read its answer) has its connection closed. A client that
disconnects cancels its request: one still waiting for a predictor worker is never run.

Example (inside a running event loop)::

    front = HttpFront(handler, "127.0.0.1", 9393, max_body_size=1 << 29, metrics=metrics)
    await front.start(); ...; await front.stop(timeout=30)
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import time
import zlib
from typing import Callable, Optional

from aiohttp import web
from google.protobuf.message import DecodeError

from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.serving_json import ParseError, parse_request, response_to_json
from distill_base.status_codes import ErrNo
from distill_base.wire_size import DEFAULT_ALLOWANCE, DecodedSizeError, WireFormatError, check_decoded_size

from .grpc_front import decoded_allowance, request_samples
from .inference import InferenceHandler, error_response
from .metrics import TeacherMetrics
from .security import TransportSecurity

logger = logging.getLogger(__name__)

INFERENCE_PATHS = ("/GeneralModelService/inference", "/GeneralModelService/debug")
PROTO_TYPE = "application/proto"
_MIN_GZIP_BYTES = 512
_SWEEP_S = 1.0

Observer = Callable[[str, str, float, int], None]  # (transport, err_no or "bad_request", seconds, samples)


class BadBody(ValueError):
    """A request body that cannot become a Request; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Refuse(asyncio.Protocol):
    """Answers a connection over the limit with 503 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 28\r\n"
                        b"Connection: close\r\n\r\ntoo many connections, retry\n")
        transport.close()


class _LimitedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections."""

    def __init__(self, handler, max_connections: int, **kwargs):
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.refused = 0

    def __call__(self):
        if len(self._connections) >= self.max_connections:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                logger.warning("HTTP: %d connections open (the limit); refused %d connection(s) so far",
                               self.max_connections, self.refused)
            return _Refuse()
        return super().__call__()


class HttpFront:
    """One HTTP port: inference + health (``handler`` given) and/or metrics (``metrics`` given)."""

    def __init__(self, handler: Optional[InferenceHandler], host: str, port: int, max_body_size: int,
                 metrics: Optional[TeacherMetrics] = None, observe: Optional[Observer] = None,
                 security: Optional[TransportSecurity] = None, max_connections: int = 256,
                 keepalive_timeout: float = 15.0, body_timeout: float = 30.0, request_timeout: float = 120.0):
        """Check the arguments.

        Raises:
            OSError: the HTTP port cannot be bound.
        """
        self.handler = handler
        self.max_body_size = int(max_body_size)
        self.max_decoded_allowance = decoded_allowance(self.max_body_size)   # protobuf bodies: read_request
        self.metrics = metrics
        self._observe = observe
        self._security = security or TransportSecurity()
        self.max_connections = max_connections
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.request_timeout = request_timeout
        self.serving = True
        self._busy: dict = {}   # aiohttp RequestHandler -> monotonic start of its request in progress
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            what = "HTTP port (--http_port)" if handler is not None else "Prometheus port (--prometheus_port)"
            raise OSError(f"cannot bind the {what} {host}:{port}: {exc}") from None
        self.port = self._sock.getsockname()[1]
        self._runner: Optional[web.ServerRunner] = None
        self._sweeper: Optional[asyncio.Task] = None

    async def start(self) -> None:
        # handler_cancellation: a client that closes its connection cancels its request's coroutine, so a
        # request still queued for a predictor worker is dropped, never run
        server = _LimitedServer(self._dispatch, self.max_connections, keepalive_timeout=self.keepalive_timeout,
                                auto_decompress=False, access_log=None, max_field_size=8190, max_headers=64,
                                lingering_time=0,  # no reading of an unread body after answering
                                handler_cancellation=True)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock, ssl_context=self._security.ssl_context(),
                            backlog=min(128, self.max_connections))
        await site.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish within ``timeout`` seconds, close every connection."""
        self.serving = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._runner is not None:
            server = self._runner.server
            try:
                await asyncio.wait_for(self._runner.cleanup(), timeout)
            except asyncio.TimeoutError:
                logger.warning("HTTP: requests still in progress after %.1fs; closing their connections", timeout)
                for conn in (server.connections if server is not None else []):
                    conn.force_close()

    async def _sweep(self) -> None:
        """Close connections whose request has been in progress longer than ``request_timeout``."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for conn, since in list(self._busy.items()):
                if now - since > self.request_timeout:
                    logger.warning("HTTP: request from %s in progress for %.0fs (> %.0fs): closing its connection",
                                   conn.peername, now - since, self.request_timeout)
                    self._busy.pop(conn, None)
                    conn.force_close()

    # -- dispatch -------------------------------------------------------------------------------------
    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        self._busy[conn] = time.monotonic()
        try:
            for middleware in self._security.http_middlewares():
                refusal = await middleware(request)
                if refusal is not None:
                    return refusal
            return await self._route(request)
        finally:
            self._busy.pop(conn, None)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if request.method == "GET":
            if path == "/health" and self.handler is not None:
                status = "SERVING" if self.serving else "NOT_SERVING"
                return self._json(request, 200 if self.serving else 503, {"status": status})
            if path == "/metrics" and self.metrics is not None:
                return web.Response(body=self.metrics.exposition(),
                                    headers={"Content-Type": self.metrics.content_type})
        if request.method == "POST" and path in INFERENCE_PATHS and self.handler is not None:
            return await self._inference(request)
        response = self._json(request, 404 if request.method in ("GET", "POST") else 405,
                              {"error": f"no such path {request.method} {path!r}; POST {INFERENCE_PATHS[0]}"})
        response.force_close()  # the body (if any) was not read
        return response

    async def _inference(self, request: web.BaseRequest) -> web.StreamResponse:
        start = time.perf_counter()
        as_json = request.content_type != PROTO_TYPE
        try:
            message = self._parse(await self._read_body(request), request, as_json, self.max_decoded_allowance)
        except BadBody as exc:
            self._record("bad_request", start, 0)
            answer = self._answer(request, exc.status, error_response(ErrNo.INPUT, str(exc)), as_json)
            if exc.status != 400:
                answer.force_close()   # the rest of the body was not read: the connection cannot go on
            return answer
        if not self.serving:
            response, status = error_response(ErrNo.SHUTDOWN, "server is shutting down", message.log_id), 503
        else:
            response, status = await self.handler.handle_async(message), 200
        self._record(str(response.err_no), start, request_samples(message))
        return self._answer(request, status, response, as_json)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.max_body_size
        length = request.content_length
        if length is not None and length > limit:
            raise BadBody(413, f"request body of {length} bytes is over --max_body_size {limit}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise BadBody(413, f"request body is over --max_body_size {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise BadBody(408, f"request body not received within {self.body_timeout:g}s") from None
        except BadBody:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken chunked encoding, a client gone mid-body, ...
            raise BadBody(400, f"request body could not be read: {exc}") from None
        body = b"".join(chunks)
        if request.headers.get("Content-Encoding", "").strip().lower() == "gzip":
            body = _gunzip(body, limit)
        return body

    @staticmethod
    def _parse(body: bytes, request: web.BaseRequest, as_json: bool,
               allowance: int = DEFAULT_ALLOWANCE) -> service_pb2.Request:
        try:
            if as_json:
                message = parse_request(body)
            else:
                check_decoded_size(body, "request", allowance)   # before protobuf allocates the typed values
                message = service_pb2.Request.FromString(body)
        except DecodedSizeError as exc:
            what = "protobuf" if isinstance(exc, WireFormatError) else "protobuf: too large once decoded"
            raise BadBody(400, f"body is not a general_model Request in {what}: {exc}") from None
        except (ParseError, DecodeError, UnicodeDecodeError, ValueError, TypeError) as exc:
            kind = f"JSON (Content-Type {request.content_type!r} is not {PROTO_TYPE})" if as_json else "protobuf"
            raise BadBody(400, f"body is not a general_model Request in {kind}: {exc}") from None
        return message

    def _record(self, err_no: str, start: float, samples: int) -> None:
        if self._observe is not None:
            self._observe("http", err_no, time.perf_counter() - start, samples)

    # -- answers --------------------------------------------------------------------------------------
    def _answer(self, request: web.BaseRequest, status: int, response: service_pb2.Response,
                as_json: bool) -> web.Response:
        if as_json:
            return self._json(request, status, response_to_json(response))
        return self._send(request, status, response.SerializeToString(), PROTO_TYPE)

    def _json(self, request: web.BaseRequest, status: int, doc: dict) -> web.Response:
        return self._send(request, status, json.dumps(doc).encode(), "application/json")

    def _send(self, request: web.BaseRequest, status: int, body: bytes, content_type: str) -> web.Response:
        headers = {"Content-Type": content_type}
        if len(body) >= _MIN_GZIP_BYTES and "gzip" in request.headers.get("Accept-Encoding", "").lower():
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        response = web.Response(status=status, body=body, headers=headers)
        if not self.serving:
            response.force_close()
        return response


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadBody(400, f"body is not valid gzip: {exc}") from None
    if len(data) > limit:
        raise BadBody(413, f"gzip body inflates to more than --max_body_size {limit} bytes")
    if not inflater.eof:
        raise BadBody(400, "body is not valid gzip: truncated stream")
    return data
