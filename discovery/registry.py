"""The ZooKeeper registry, re-exported in one place (older imports keep working).

Each piece lives in a module of its own:
- ``discovery.arguments``: names, limits, errors, argument checks (hosts, endpoints, auth, ``ServicePaths``);
- ``discovery.session``: ``ZkSession`` (one kazoo client, reconnects forever) and ``retry_forever`` (KazooRetry);
- ``discovery.acls``: ``service_acls``, ``ensure_service`` (restrictive ACLs, squatted-service detection);
- ``discovery.ephemeral``: ``EphemeralNode`` (one ephemeral sequential node kept present while wanted);
- ``discovery.nodes``: ``TeacherInfo``, ``StudentInfo`` and the bounded parsing of untrusted node data;
- ``discovery.watcher``: ``ServiceWatcher`` and ``ServiceView`` (kazoo's DataWatch and ChildrenWatch recipes).
"""
from .acls import ensure_service, service_acls, teacher_node_acl
from .arguments import (
    AUTH_ENV,
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    STUDENT_PREFIX,
    STUDENTS_NODE,
    TEACHER_PREFIX,
    DiscoveryError,
    NoTeachersError,
    RegistryAuthError,
    ServicePaths,
    ServiceSquattedError,
    default_student_id,
    node_sequence,
    normalize_hosts,
    parse_auth,
    resolve_auth,
    validate_endpoint,
)
from .ephemeral import EphemeralNode
from .nodes import StudentInfo, TeacherInfo
from .session import ZkSession, retry_forever
from .watcher import ServiceView, ServiceWatcher

__all__ = [
    "AUTH_ENV", "DEFAULT_ROOT", "DEFAULT_SESSION_TIMEOUT", "STUDENT_PREFIX", "STUDENTS_NODE", "TEACHER_PREFIX",
    "DiscoveryError", "NoTeachersError", "RegistryAuthError", "ServiceSquattedError", "ServicePaths",
    "default_student_id", "node_sequence", "normalize_hosts", "parse_auth", "resolve_auth", "validate_endpoint",
    "ensure_service", "service_acls", "teacher_node_acl", "EphemeralNode", "StudentInfo", "TeacherInfo",
    "ZkSession", "retry_forever", "ServiceView", "ServiceWatcher",
]
