"""ZooKeeper ACLs of a service: who may register teachers, who may register students, who owns the folders.

With an identity (``--zk_auth user:password`` or ``DISTILL_ZK_AUTH``), digest scheme (ZooKeeper's
``DigestAuthenticationProvider``: ``user:base64(sha1(user:password))``):

    <root>                    [digest(user):ALL, world:READ]           when we create it (an existing root is kept)
    <root>/<service>          [digest(user):ALL, world:READ]           teachers: only the identity registers
    <root>/<service>/teacher-*  the same
    <root>/<service>/students [digest(user):ALL, world:READ|CREATE|DELETE]   students need no identity
    <root>/<service>/assignment  the same as students: the students' assigner writes there (discovery.assigner)

Everyone still reads (world:READ), so students follow teachers without any identity. A service node that already
exists is checked first: open (world:ALL, e.g. created by a student or an anonymous teacher) is claimed with
setACL and the teacher nodes in it that are not the identity's are removed; owned by another identity it is
*squatted* and ``ServiceSquattedError`` says by whom. Without an identity every node is open to everyone
(``OPEN_ACL_UNSAFE``): the register script and ``teachers.serve --zk`` refuse that unless ``--allow_open_acl``.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from kazoo.exceptions import NoAuthError, NodeExistsError, NoNodeError
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Permissions, make_acl, make_digest_acl, make_digest_acl_credential

from .arguments import AUTH_ENV, TEACHER_PREFIX, RegistryAuthError, ServicePaths, ServiceSquattedError, parse_auth
from .session import ZkSession

logger = logging.getLogger(__name__)


def service_acls(auth: Optional[str]) -> tuple[list[ACL], list[ACL]]:
    """ACLs of (root, service and teacher nodes; students node): with auth, only that identity writes."""
    credentials = parse_auth(auth)
    if credentials is None:
        return list(OPEN_ACL_UNSAFE), list(OPEN_ACL_UNSAFE)
    owner = make_digest_acl(credentials[0], credentials[1], all=True)
    readers = make_acl("world", "anyone", read=True)
    students = make_acl("world", "anyone", read=True, create=True, delete=True)
    return [owner, readers], [owner, students]


def teacher_node_acl(auth: Optional[str]) -> list[ACL]:
    return service_acls(auth)[0]


def is_open(acls: Sequence[ACL]) -> bool:
    """True when anyone may write (world:anyone with CREATE, WRITE or DELETE)."""
    writes = Permissions.CREATE | Permissions.WRITE | Permissions.DELETE
    return any(acl.id.scheme == "world" and acl.perms & writes for acl in acls)


def ensure_service(session: ZkSession, paths: ServicePaths, auth: Optional[str]) -> None:
    """Create the root, service, students and assignment nodes if missing; with auth, claim them with the service ACLs.

    Raises:
        ServiceSquattedError: the service node belongs to another identity.
        RegistryAuthError: ZooKeeper refused a write for another reason (wrong password for the owner, ...).
    """
    service_acl, students_acl = service_acls(auth)
    try:
        if paths.root != "/" and not session.retry("exists", paths.root):
            _create_quietly(session, paths.root, service_acl, makepath=True)
        if auth:
            _check_owner(session, paths, auth)
        _create_quietly(session, paths.service_path, service_acl)
        _create_quietly(session, paths.students_path, students_acl)
        _create_quietly(session, paths.assignment_path, students_acl)
        if auth:
            _claim(session, paths, auth, service_acl, students_acl)
    except NoAuthError as exc:
        raise RegistryAuthError(f"ZooKeeper refused to set up {paths.service_path}: not authorized as "
                                f"{session.auth_user or 'an anonymous client'} (another identity owns the "
                                f"service or the root {paths.root}; check --zk_auth or {AUTH_ENV})") from exc


def _check_owner(session: ZkSession, paths: ServicePaths, auth: str) -> None:
    """ServiceSquattedError when the service node exists, is not open and does not list our identity."""
    user, password = parse_auth(auth)
    ours = make_digest_acl_credential(user, password)
    try:
        acls, _ = session.retry("get_acls", paths.service_path)
    except NoNodeError:
        return
    except NoAuthError:
        acls = []
    digests = [acl.id.id for acl in acls if acl.id.scheme == "digest"]
    if is_open(acls) or ours in digests:
        return
    owners = sorted({digest.split(":", 1)[0] for digest in digests})
    if user in owners:
        return        # same user, another password: ZooKeeper's NoAuthError below says "not authorized as user"
    owner = f"identity {', '.join(owners)}" if owners else "another identity (its ACL is not readable)"
    raise ServiceSquattedError(
        f"service {paths.service_path} is squatted: it was created first by {owner}, not by {user}; "
        "only its owner may register teachers there. Ask the "
        f"ZooKeeper administrator to delete {paths.service_path}, or register under another --service or --root")


def _claim(session: ZkSession, paths: ServicePaths, auth: str, service_acl: list, students_acl: list) -> None:
    for path, wanted in ((paths.service_path, service_acl), (paths.students_path, students_acl),
                         (paths.assignment_path, students_acl)):
        current, _ = session.retry("get_acls", path)
        if _acl_set(current) == _acl_set(wanted):
            continue
        if is_open(current) and path == paths.service_path:
            logger.warning("service %s was open to everyone; claiming it for %s (everyone may still read)",
                           path, session.auth_user)
        session.retry("set_acls", path, wanted)
        logger.info("set ACLs of %s: %s may write, everyone may read", path, session.auth_user)
        if path == paths.service_path:
            _remove_foreign_teachers(session, paths, service_acl)


def _remove_foreign_teachers(session: ZkSession, paths: ServicePaths, service_acl: list) -> None:
    """Teacher nodes created while the service was open, by anyone: not ours, so students must not follow them."""
    for name in session.retry("get_children", paths.service_path):
        if not name.startswith(TEACHER_PREFIX):
            continue
        path = f"{paths.service_path}/{name}"
        try:
            acls, _ = session.retry("get_acls", path)
            if _acl_set(acls) != _acl_set(service_acl):
                session.retry("delete", path)
                logger.warning("removed teacher node %s: registered while the service was open, not by %s",
                               path, session.auth_user)
        except NoNodeError:
            continue


def _create_quietly(session: ZkSession, path: str, acl: list, makepath: bool = False) -> None:
    try:
        session.retry("create", path, b"", acl=acl, makepath=makepath)
    except NodeExistsError:
        pass


def _acl_set(acls: Sequence[ACL]) -> set:
    return {(acl.perms, acl.id.scheme, acl.id.id) for acl in acls}
