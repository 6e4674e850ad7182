"""HTTP side of the teacher server (Paddle Serving's HttpClient protocol), on ``--http_port``.

- ``POST /GeneralModelService/inference`` (also ``/debug``): body = Request as ``application/proto`` (the real
  client's default) or ``application/json`` (proto field names); ``Content-Encoding: gzip`` bodies are
  inflated; the answer is a Response in the same content type, gzipped when ``Accept-Encoding`` allows.
- ``GET /health``: 200 ``{"status": "SERVING"}`` (503 while draining).
- ``GET /metrics``: Prometheus text, when the server was given a ``RequestStats``.

Example::

    front = HttpFront(handler, "127.0.0.1", 9393, max_body_size=1 << 29, stats=stats)
    front.start(); ...; front.stop()
"""
from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from distill_reader.proto import general_model_service_pb2 as service_pb2

from .inference import ERR_INPUT, ERR_SHUTDOWN, InferenceHandler, error_response
from .stats import RequestStats

logger = logging.getLogger(__name__)

INFERENCE_PATHS = ("/GeneralModelService/inference", "/GeneralModelService/debug")
_MIN_GZIP_BYTES = 512


class _Server(ThreadingHTTPServer):
    daemon_threads = False   # server_close() joins the request threads: in-flight requests finish
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    inference: Optional[InferenceHandler]
    stats: Optional[RequestStats]
    max_body_size: int
    draining: bool
    connections: set
    connections_lock: threading.Lock

    def close_idle_connections(self) -> None:
        """Shut idle keep-alive connections so that their threads end; busy ones close after answering."""
        with self.connections_lock:
            idle = [h for h in self.connections if not h.busy]
        for handler in idle:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds an idle keep-alive connection may stay open
    busy = False

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self)
        super().finish()

    def parse_request(self) -> bool:
        self.busy = True  # a request line arrived: this connection has a request in flight
        return super().parse_request()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.busy = False
        if self.server.draining:
            self.close_connection = True

    def log_message(self, fmt: str, *args) -> None:  # route http.server's access log to logging
        logger.debug("%s " + fmt, self.address_string(), *args)

    # -- GET ------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0]
        if path == "/health" and self.server.inference is not None:
            status = "NOT_SERVING" if self.server.draining else "SERVING"
            self._send(503 if self.server.draining else 200, json.dumps({"status": status}).encode(),
                       "application/json")
        elif path == "/metrics" and self.server.stats is not None:
            self._send(200, self.server.stats.prometheus_text().encode(), "text/plain; version=0.0.4")
        else:
            self._send(404, json.dumps({"error": f"no such path {path!r}"}).encode(), "application/json")

    # -- POST -----------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        start = time.perf_counter()
        path = self.path.split("?")[0]
        as_json = self.headers.get("Content-Type", "").split(";")[0].strip().lower() == "application/json"
        if path not in INFERENCE_PATHS or self.server.inference is None:
            self._drain_body()
            self._send(404, json.dumps({"error": f"no such path {path!r}; POST {INFERENCE_PATHS[0]}"}).encode(),
                       "application/json")
            return
        status, request, error = self._read_request(as_json)
        if request is None:
            response = error_response(ERR_INPUT, error)
        elif self.server.draining:
            status, response = 503, error_response(ERR_SHUTDOWN, "server is shutting down", request.log_id)
        else:
            response = self.server.inference.handle(request)
        if self.server.stats is not None:
            samples = int(request.tensor[0].shape[0]) if request is not None and request.tensor and \
                request.tensor[0].shape else 0
            self.server.stats.observe(time.perf_counter() - start, samples, response.err_no == 0)
        self._answer(status, response, as_json)

    def _read_request(self, as_json: bool) -> tuple[int, Optional[service_pb2.Request], str]:
        limit = self.server.max_body_size
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return 411, None, "Content-Length header missing or not a number"
        if length > limit:
            self.close_connection = True  # do not read the oversized body
            return 413, None, f"request body of {length} bytes is over --max_body_size {limit}"
        body = self.rfile.read(length)
        if self.headers.get("Content-Encoding", "").strip().lower() == "gzip":
            try:
                body = _gunzip(body, limit)
            except (OSError, EOFError, zlib.error) as exc:
                return 400, None, f"body is not valid gzip: {exc}"
            except ValueError as exc:
                return 413, None, str(exc)
        request = service_pb2.Request()
        try:
            if as_json:
                json_format.Parse(body, request)
            else:
                request.ParseFromString(body)
        except (json_format.ParseError, DecodeError, UnicodeDecodeError, ValueError) as exc:
            kind = "JSON" if as_json else "protobuf"
            return 400, None, f"body is not a general_model Request in {kind}: {exc}"
        return 200, request, ""

    def _answer(self, status: int, response: service_pb2.Response, as_json: bool) -> None:
        if as_json:
            doc = json_format.MessageToDict(response, preserving_proto_field_name=True)
            doc.update(err_no=response.err_no, err_msg=response.err_msg, log_id=response.log_id)
            self._send(status, json.dumps(doc).encode(), "application/json")
        else:
            self._send(status, response.SerializeToString(), "application/proto")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        gzip_ok = "gzip" in self.headers.get("Accept-Encoding", "").lower()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzip_ok and len(body) >= _MIN_GZIP_BYTES:
            body = gzip.compress(body, compresslevel=1)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _drain_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if 0 < length <= self.server.max_body_size:
            self.rfile.read(length)
        elif length:
            self.close_connection = True


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = inflater.decompress(body, limit + 1)
    if len(data) > limit:
        raise ValueError(f"gzip body inflates to more than --max_body_size {limit} bytes")
    if not inflater.eof:
        raise zlib.error("truncated gzip stream")
    return data


class HttpFront:
    """A ThreadingHTTPServer in a background thread; ``stop`` lets in-flight requests finish."""

    def __init__(self, handler: Optional[InferenceHandler], host: str, port: int, max_body_size: int,
                 stats: Optional[RequestStats] = None):
        self._server = _Server((host, port), _Handler)
        self._server.inference = handler
        self._server.stats = stats
        self._server.max_body_size = int(max_body_size)
        self._server.draining = False
        self._server.connections = set()
        self._server.connections_lock = threading.Lock()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"http-{self.port}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_not_serving(self) -> None:
        self._server.draining = True

    def stop(self) -> None:
        """Stop accepting connections and wait for the requests being handled."""
        self._server.draining = True
        self._server.shutdown()
        self._server.close_idle_connections()
        self._server.server_close()
        self._thread.join(timeout=5)
