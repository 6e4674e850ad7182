"""Discovery's names, limits, errors and argument checks: ZooKeeper hosts, teacher endpoints, auth strings,
service paths. No ZooKeeper connection here.

Layout (root default ``/distill``)::

    <root>/<service>                      persistent; with an identity: only it writes, everyone reads
    <root>/<service>/teacher-0000000007   ephemeral sequential, JSON {"endpoint": "host:port", "model": ..., ...}
    <root>/<service>/students             persistent; everyone may create and delete children
    <root>/<service>/students/student-0000000003   ephemeral sequential, JSON {"student_id": ..., ...}
    <root>/<service>/assignment           persistent; everyone may create and delete children
    <root>/<service>/assignment/assigner  kazoo Lock of the students' election (one contender node per student)
    <root>/<service>/assignment/student-0000000003  persistent, JSON {"teachers": [...], "endpoints": [...]}
"""
from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from distill_base.endpoints import parse_endpoint, parse_endpoints

DEFAULT_ROOT = "/distill"
# Why 6 s: a dead machine's teachers leave every student's list within 6-8 s, while a process stalled for up to
# 4 s (GC, a busy 2-core box, a ZooKeeper restart) keeps its session: kazoo drops the connection after 2/3 of the
# timeout without an answer and reconnects within the rest. A teacher whose server dies while its registrar lives
# is removed by the health check in about a second, independent of this. See docs/architecture.md "Discovery".
DEFAULT_SESSION_TIMEOUT = 6.0
AUTH_ENV = "DISTILL_ZK_AUTH"
TEACHER_PREFIX = "teacher-"
STUDENTS_NODE = "students"
STUDENT_PREFIX = "student-"
ASSIGNMENT_NODE = "assignment"
ASSIGNER_LOCK = "assigner"
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")   # fullmatch


class DiscoveryError(RuntimeError):
    """A discovery operation failed for a reason worth telling the user."""


class RegistryAuthError(DiscoveryError):
    """ZooKeeper refused a write: the identity in --zk_auth / DISTILL_ZK_AUTH may not create or delete there."""


class ServiceSquattedError(RegistryAuthError):
    """The service node exists and belongs to another ZooKeeper identity (created first by someone else)."""


class NoTeachersError(DiscoveryError):
    """No teacher was registered for a service within the allowed time."""


def normalize_hosts(zk_hosts: Union[str, Sequence[str]]) -> str:
    """``'h1:2181,h2:2181[/chroot]'`` from a string or a list of ``host[:port]`` (port 2181 by default), as kazoo
    takes it; ValueError naming a bad or missing host."""
    text = zk_hosts if isinstance(zk_hosts, str) else ",".join(zk_hosts)
    hosts, slash, chroot = text.partition("/")
    endpoints = parse_endpoints(hosts, what="ZooKeeper host", default_port=2181)
    return ",".join(str(endpoint) for endpoint in endpoints) + slash + chroot


def validate_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` stripped if it is ``host:port`` students can dial; ValueError naming it otherwise."""
    return str(parse_endpoint(endpoint, what="teacher endpoint", allow_wildcard=False))


def parse_auth(auth: Optional[str]) -> Optional[tuple[str, str]]:
    """``'user:password'`` -> ``('user', 'password')``; None stays None; ValueError on any other form.

    Raises:
        ValueError: ``auth`` is not ``'user:password'`` with both parts non-empty.
    """
    if auth is None or auth == "":
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("ZooKeeper auth must be 'user:password' (from --zk_auth or the "
                         f"{AUTH_ENV} environment variable)")
    return user, password


def resolve_auth(value: Optional[str]) -> Optional[str]:
    """The auth string to use: ``value`` when given, else the ``DISTILL_ZK_AUTH`` environment variable."""
    return value if value else (os.environ.get(AUTH_ENV) or None)


@dataclass(frozen=True)
class ServicePaths:
    """Where a service lives in ZooKeeper; ValueError for a relative root or a service name with '/'."""

    root: str
    service: str

    def __post_init__(self) -> None:
        if not self.root.startswith("/") or self.root.endswith("/") and self.root != "/":
            raise ValueError(f"ZooKeeper root must be an absolute path like '/distill', not {self.root!r}")
        if not _SERVICE_NAME.fullmatch(self.service) or self.service in (".", ".."):
            raise ValueError(f"service name {self.service!r} may only hold letters, digits, '_', '-' and '.'")

    @property
    def service_path(self) -> str:
        return f"{self.root.rstrip('/')}/{self.service}"

    @property
    def students_path(self) -> str:
        return f"{self.service_path}/{STUDENTS_NODE}"

    @property
    def assignment_path(self) -> str:
        return f"{self.service_path}/{ASSIGNMENT_NODE}"

    @property
    def assigner_lock_path(self) -> str:
        return f"{self.assignment_path}/{ASSIGNER_LOCK}"

    def assignment_of(self, student_node: str) -> str:
        """The assignment node of the student registered as ``student_node`` (``student-0000000003``)."""
        return f"{self.assignment_path}/{student_node}"


def node_sequence(name: str) -> int:
    """The sequence number ZooKeeper appended to a sequential node's name (-1 when there is none)."""
    digits = name[-10:]
    return int(digits) if len(digits) == 10 and digits.isdigit() else -1


def default_student_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
