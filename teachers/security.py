"""The one place where the teacher server's transport security is decided: TLS credentials and request
authentication for gRPC and HTTP. Today both fronts are plaintext without authentication (``--host`` decides
who can reach them); a later change plugs TLS (``grpc.ssl_server_credentials`` / an ``ssl.SSLContext``) and a
bearer-token check in here, and the fronts pick them up without other changes.

Example::

    security = TransportSecurity.from_args(args)
    port = security.bind_grpc(server, "127.0.0.1:9393")     # add_insecure_port or add_secure_port
    site = web.SockSite(runner, sock, ssl_context=security.ssl_context())
"""
from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from typing import Optional

import grpc


@dataclass(frozen=True)
class TransportSecurity:
    """Credentials and request checks for both fronts (none yet: plaintext, no authentication)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransportSecurity:
        return cls()

    def grpc_credentials(self) -> Optional[grpc.ServerCredentials]:
        """Server credentials for gRPC (None: plaintext)."""
        return None

    def grpc_interceptors(self) -> list:
        """grpc.aio server interceptors (e.g. a bearer-token check)."""
        return []

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """TLS context for the HTTP fronts (None: plaintext)."""
        return None

    def http_middlewares(self) -> list:
        """Request checks run before every HTTP handler (e.g. a bearer-token check): async callables taking the
        aiohttp request and returning None (go on) or the ``web.Response`` to answer instead (e.g. 401)."""
        return []

    def bind_grpc(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``server`` to ``address`` with these credentials; returns the port (0 when binding failed)."""
        credentials = self.grpc_credentials()
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
