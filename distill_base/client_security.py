"""What a student presents to its teachers: TLS (server CA, optional client certificate) and a bearer token.

``ClientSecurity`` is built once from ``DistillReader`` / ``TeacherClient`` arguments and applied to every
gRPC channel and HTTP session. The token goes in the gRPC metadata ``authorization: Bearer <token>`` and in the
HTTP ``Authorization`` header, the conventions of gRPC and of RFC 6750; it is never put on a command line (take
it from ``DISTILL_TEACHER_TOKEN`` or a file).

Example::

    security = ClientSecurity(tls_ca="ca.pem", token=open("token").read().strip())
    channel = security.grpc_channel("teacher-7:9292", options=[])
    stub.inference(request, metadata=security.metadata())
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Optional

import grpc

logger = logging.getLogger(__name__)

TOKEN_ENV = "DISTILL_TEACHER_TOKEN"


def read_file(path: str, what: str, error: type = ValueError) -> bytes:
    """The bytes of a PEM or token file; ``error`` naming ``what`` and the path when it cannot be read.

    Raises:
        error (default ValueError): the file cannot be read; the message names ``what`` and the path.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise error(f"cannot read the {what} {path!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ClientSecurity:
    """TLS files (PEM paths) and a bearer token; all optional. ``tls_cert`` and ``tls_key`` go together.

    Raises ValueError naming the file when one cannot be read, or when only one of cert/key is given.
    """

    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    token: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("tls_ca", "tls_cert", "tls_key"):   # os.PathLike -> str: the settings travel to workers
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (a client certificate needs its private key)")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("a client certificate (tls_cert) needs TLS: give the teachers' CA as tls_ca too")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ValueError("the teacher token must be one non-empty line")
        for path, what in ((self.tls_ca, "TLS CA file"), (self.tls_cert, "TLS certificate"),
                           (self.tls_key, "TLS private key")):
            if path:
                read_file(path, what)

    @classmethod
    def create(cls, tls_ca: Optional[str] = None, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
               token: Optional[str] = None) -> ClientSecurity:
        """As the constructor, with the token from ``DISTILL_TEACHER_TOKEN`` when not given."""
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        return cls(tls_ca, tls_cert, tls_key, token.strip() if token else None)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def grpc_channel(self, endpoint: str, options: list) -> grpc.Channel:
        """A secure channel when TLS is configured, else an insecure one (a warning if a token would travel
        in clear text to another host)."""
        if not self.tls:
            if self.token and not _is_loopback(endpoint):
                logger.warning("teacher %s: the bearer token is sent without TLS (give tls_ca)", endpoint)
            return grpc.insecure_channel(endpoint, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_file(self.tls_ca, "TLS CA file"),
            private_key=read_file(self.tls_key, "TLS private key") if self.tls_key else None,
            certificate_chain=read_file(self.tls_cert, "TLS certificate") if self.tls_cert else None)
        return grpc.secure_channel(endpoint, credentials, options=options)

    def metadata(self) -> Optional[tuple]:
        """gRPC call metadata carrying the token, or None."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def http_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def requests_options(self) -> dict:
        """``verify`` and ``cert`` for a requests session."""
        if not self.tls:
            return {}
        options: dict = {"verify": self.tls_ca}
        if self.tls_cert:
            options["cert"] = (self.tls_cert, self.tls_key)
        return options

    def tls_refusal(self, endpoint: str, timeout: float) -> Optional[str]:
        """Why TLS between this client and ``endpoint`` cannot work, found by one TLS handshake with these
        settings, or None when nothing definite was learned (unreachable, or the handshake is fine).

        For the errors a closed connection leaves ambiguous: plaintext to a TLS teacher, and a client certificate
        the teacher refuses (TLS 1.3 sends that alert after the handshake, so one read follows it).
        """
        host, _, port = endpoint.rpartition(":")
        try:
            context = self._probe_context()
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
                with context.wrap_socket(raw) as tls:
                    if not self.tls:
                        return "the teacher serves TLS but this client connects in plaintext: give tls_ca"
                    tls.settimeout(min(timeout, 0.5))
                    if tls.recv(1) == b"":    # closed at once (gRPC's refusal); data or silence: accepted
                        return self._refused("the teacher closed the connection right after the TLS handshake")
        except ssl.SSLCertVerificationError as exc:
            return f"the teacher's certificate does not verify with tls_ca {self.tls_ca}: {exc.verify_message}"
        except ssl.SSLError as exc:
            if any(alert in str(exc.reason) for alert in _CLIENT_CERT_ALERTS):
                return self._refused(f"the teacher sent the TLS alert {exc.reason}")
        except (OSError, ValueError):
            pass
        return None

    def _refused(self, what: str) -> str:
        given = f"client certificate {self.tls_cert}" if self.tls_cert else "no client certificate"
        return (f"{what}: it does not accept this client's certificate ({given}; a teacher started with "
                f"--tls_client_ca needs tls_cert/tls_key signed by that CA)")

    def _probe_context(self) -> ssl.SSLContext:
        if not self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE        # only asks whether the port speaks TLS
            return context
        context = ssl.create_default_context(cafile=self.tls_ca)
        context.check_hostname = False                 # gRPC checks the name; here only the chain matters
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        context.set_alpn_protocols(["h2", "http/1.1"])
        return context

    def settings(self) -> dict:
        """What a worker process needs to build the same security (sent over its private socket)."""
        return {"tls_ca": self.tls_ca, "tls_cert": self.tls_cert, "tls_key": self.tls_key, "token": self.token}


# TLS alerts (OpenSSL reason names) by which a server refuses the client's certificate.
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                       "HANDSHAKE_FAILURE")


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
