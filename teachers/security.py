"""The one place where the teacher server's transport security is decided: TLS credentials and request
authentication for gRPC and HTTP, from ``teachers.serve``'s ``--tls_cert --tls_key [--tls_client_ca]`` and
``--token_file``.

- TLS: gRPC and HTTP serve with the certificate and key; with ``--tls_client_ca`` both require a client
  certificate signed by that CA (mutual TLS), refused in the TLS handshake otherwise.
- Token: every request but the health checks must carry ``authorization: Bearer <token>`` (gRPC metadata, the
  HTTP ``Authorization`` header; RFC 6750's form); otherwise gRPC UNAUTHENTICATED / HTTP 401. The token is read
  from a file (never the command line, where ``ps`` shows it) and compared in constant time.
- Health checks (gRPC ``grpc.health.v1.Health``, HTTP ``GET /health``) stay open so that load balancers and the
  register script need no token (they still need the TLS CA, and a client certificate under mutual TLS).

Example::

    security = TransportSecurity.from_args(args)
    port = security.bind_grpc(server, "0.0.0.0:9393")     # add_secure_port when TLS is on
    site = web.SockSite(runner, sock, ssl_context=security.ssl_context())
"""
from __future__ import annotations

import argparse
import errno
import hmac
import logging
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from typing import Optional

import grpc

from distill_base.client_security import read_file

logger = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
OPEN_HTTP_PATHS = ("/health",)
MAX_TOKEN_BYTES = 4096


_REFUSAL_LOG_INTERVAL_S = 10.0
_last_refusal_log = [0.0]


def _log_refusal(transport: str, peer: str) -> None:
    """One warning per 10 s at most: a client without the right token (a flood must not flood the log)."""
    now = time.monotonic()
    if now - _last_refusal_log[0] >= _REFUSAL_LOG_INTERVAL_S:
        _last_refusal_log[0] = now
        logger.warning("refused a %s request without the right bearer token from %s (further refusals within "
                       "%.0fs are not logged)", transport, peer or "an unknown peer", _REFUSAL_LOG_INTERVAL_S)


class SecurityConfigError(ValueError):
    """A TLS or token option that cannot be used (missing file, cert without key, empty token); names it."""


def _read(path: str, what: str) -> bytes:
    return read_file(path, what, error=SecurityConfigError)


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (one line; surrounding whitespace dropped). Warns when others may read it.

    Raises:
        SecurityConfigError: the file cannot be read, is over MAX_TOKEN_BYTES, or is not one non-empty line.
    """
    data = _read(path, "token file")
    if len(data) > MAX_TOKEN_BYTES:
        raise SecurityConfigError(f"token file {path!r} holds {len(data)} bytes; a token is one short line")
    token = data.decode("utf-8", "replace").strip()
    if not token or "\n" in token or "\r" in token:
        raise SecurityConfigError(f"token file {path!r} must hold one non-empty line")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("token file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
    return token


@dataclass(frozen=True)
class TransportSecurity:
    """TLS files (PEM paths) and the bearer token for both fronts; all None: plaintext, no authentication."""

    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    token: Optional[str] = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityConfigError("--tls_cert and --tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise SecurityConfigError("--tls_client_ca (mutual TLS) needs TLS: give --tls_cert and --tls_key")
        for path, what in ((self.tls_cert, "TLS certificate"), (self.tls_key, "TLS key"),
                           (self.tls_client_ca, "client CA")):
            if path:
                _read(path, what)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransportSecurity:
        token_file = getattr(args, "token_file", None)
        return cls(getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                   getattr(args, "tls_client_ca", None), read_token_file(token_file) if token_file else None)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def describe(self) -> str:
        """For the start-up log line: what protects the fronts."""
        parts = ["mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"]
        parts.append("bearer token" if self.token else "no authentication")
        return ", ".join(parts)

    def grpc_credentials(self) -> Optional[grpc.ServerCredentials]:
        """Server credentials for gRPC (None: plaintext)."""
        if not self.tls:
            return None
        client_ca = _read(self.tls_client_ca, "client CA") if self.tls_client_ca else None
        return grpc.ssl_server_credentials([(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS "
                                                                                        "certificate"))],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)

    def grpc_interceptors(self) -> list:
        """grpc.aio server interceptors: the bearer-token check when a token is set."""
        return [_TokenInterceptor(self.token)] if self.token else []

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """TLS context for the HTTP fronts (None: plaintext)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.tls_client_ca)
        return context

    def http_middlewares(self) -> list:
        """Request checks run before every HTTP handler: the bearer-token check when a token is set."""
        if not self.token:
            return []
        expected = f"Bearer {self.token}".encode()

        async def check_token(request):
            from aiohttp import web

            if request.path in OPEN_HTTP_PATHS:
                return None
            if hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
                return None
            _log_refusal("HTTP", str(request.remote))
            return web.json_response({"err_no": 401, "err_msg": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="distill-teacher"'})
        return [check_token]

    def bind_grpc(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``server`` to ``address`` with these credentials; returns the port (0 when binding failed).

        Raises:
            OSError: grpc refused the port (e.g. in use).
        """
        credentials = self.grpc_credentials()
        try:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
        except RuntimeError as exc:   # grpc.aio raises instead of returning 0 (e.g. the port is in use)
            in_use = " (already in use by another process: stop it or pick another --port)" if _port_in_use(
                address) else ""
            raise OSError(f"cannot bind gRPC port {address}{in_use}: {exc}") from None


def _port_in_use(address: str) -> bool:
    """True when binding ``host:port`` fails with EADDRINUSE (gRPC's own error only says "No address added")."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every RPC but the health checks unless ``authorization: Bearer <token>`` matches."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            _log_refusal("gRPC", context.peer())     # (the interceptor itself does not see the peer)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token "
                                                                 "(metadata 'authorization: Bearer ...')")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return await continuation(handler_call_details)
        return self._deny
