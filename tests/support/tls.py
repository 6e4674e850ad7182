"""Certificates made at test time with the ``cryptography`` package: a CA, a server certificate for the loopback
addresses, a client certificate, and a second CA that signed neither (a wrong CA).

Example::

    pki = make_pki(tmp_path)
    TeacherServer(model_dir, extra_args=["--tls_cert", pki.server_cert, "--tls_key", pki.server_key])
    TeacherClient(endpoint, conf, tls_ca=pki.ca_cert)
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_cert: str            # a CA that signed nothing here
    stranger_cert: str            # a client certificate signed by the other CA
    stranger_key: str


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(common_name: str):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, common_name: str, server: bool):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(folder) -> Pki:
    """Write the PEM files into ``folder`` and return their paths."""
    folder = str(folder)
    ca_key, ca = _ca("distill-reader test CA")
    other_key, other = _ca("someone else's CA")
    server_key, server = _leaf(ca_key, ca, "teacher", server=True)
    client_key, client = _leaf(ca_key, ca, "student", server=False)
    stranger_key, stranger = _leaf(other_key, other, "stranger", server=False)
    pem = serialization.Encoding.PEM
    return Pki(
        ca_cert=_write(os.path.join(folder, "ca.pem"), ca.public_bytes(pem)),
        server_cert=_write(os.path.join(folder, "server.pem"), server.public_bytes(pem)),
        server_key=_write(os.path.join(folder, "server.key"), _pem_key(server_key)),
        client_cert=_write(os.path.join(folder, "client.pem"), client.public_bytes(pem)),
        client_key=_write(os.path.join(folder, "client.key"), _pem_key(client_key)),
        other_ca_cert=_write(os.path.join(folder, "other-ca.pem"), other.public_bytes(pem)),
        stranger_cert=_write(os.path.join(folder, "stranger.pem"), stranger.public_bytes(pem)),
        stranger_key=_write(os.path.join(folder, "stranger.key"), _pem_key(stranger_key)),
    )
