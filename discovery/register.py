"""The discovery register script: keep a teacher registered in ZooKeeper while it answers its health check.

Example::

    DISTILL_ZK_AUTH=teacher:secret python -m discovery.register --zk 127.0.0.1:2181 --service mnist_teacher \
        --endpoint 127.0.0.1:9292

SIGTERM or SIGINT removes the node and exits 0. Exit 1 when ZooKeeper refuses the write (auth / ACL, a service
squatted by another identity), exit 2 on bad arguments (among them: no identity and no --allow_open_acl).
``add_zk_arguments(parser)`` and ``registration_from_args(args, endpoint)`` let other command
lines (``teachers.serve --zk ... --service ...``) offer the same flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from distill_base.cli_help import DefaultsHelpFormatter
from distill_base.client_security import ClientSecurity

from .arguments import (
    AUTH_ENV,
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    RegistryAuthError,
    ServiceSquattedError,
    parse_auth,
    resolve_auth,
)
from .teacher_registration import TeacherRegistration

logger = logging.getLogger("discovery.register")


def add_zk_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add --zk, --service, --root, --zk_auth, --session_timeout and the health-check flags to ``parser``."""
    group = parser.add_argument_group("ZooKeeper registration")
    group.add_argument("--zk", required=required, metavar="HOSTS",
                       help="ZooKeeper ensemble as 'host:port[,host:port...]', e.g. 127.0.0.1:2181")
    group.add_argument("--service", required=required, metavar="NAME",
                       help="service name the students ask for (DistillReader.set_dynamic_teacher's "
                            "teacher_service_name); letters, digits, '_', '-', '.'")
    group.add_argument("--root", "--zk_root", dest="root", default=DEFAULT_ROOT, metavar="PATH",
                       help=f"ZooKeeper folder holding all services (default {DEFAULT_ROOT}); the teacher's node "
                            "is <root>/<service>/teacher-NNNNNNNNNN")
    group.add_argument("--zk_auth", default=None, metavar="USER:PASSWORD",
                       help="digest identity for ZooKeeper; when set, only this identity may create or delete "
                            f"nodes under the service and everyone else may only read. Default: the {AUTH_ENV} "
                            "environment variable (prefer it: command lines are visible to other users)")
    group.add_argument("--allow_open_acl", action="store_true",
                       help="register without an identity, with ZooKeeper's open ACL: anyone who reaches "
                            "ZooKeeper may then register a teacher that students feed, or delete this one. "
                            f"Without --zk_auth / {AUTH_ENV} registration is refused unless this is given")
    group.add_argument("--session_timeout", type=float, default=DEFAULT_SESSION_TIMEOUT, metavar="SECONDS",
                       help=f"ZooKeeper session timeout (default {DEFAULT_SESSION_TIMEOUT:g}); if this process "
                            "dies without a goodbye, its node vanishes after about this long. The server clamps "
                            "it to its own [minSessionTimeout, maxSessionTimeout]")
    group.add_argument("--health_interval", type=float, default=1.0, metavar="SECONDS",
                       help="seconds between gRPC health checks of the teacher (default 1)")
    group.add_argument("--health_timeout", type=float, default=1.0, metavar="SECONDS",
                       help="seconds one health check may take before it counts as failed (default 1)")
    group.add_argument("--unhealthy_after", type=int, default=2, metavar="N",
                       help="failed health checks in a row before the node is removed (default 2); one good "
                            "check registers it again (a teacher that keeps flapping waits longer each time)")


def registration_from_args(args: argparse.Namespace, endpoint: str, meta: Optional[dict] = None,
                           health_check: Optional[Callable[[], bool]] = None) -> TeacherRegistration:
    """A TeacherRegistration from flags added by ``add_zk_arguments`` (and the script's TLS flags, if any)."""
    security = ClientSecurity(getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                              getattr(args, "tls_key", None))
    return TeacherRegistration(args.zk, args.service, endpoint, meta=meta, root=args.root,
                               auth=resolve_auth(args.zk_auth), health_interval=args.health_interval,
                               health_timeout=args.health_timeout, unhealthy_after=args.unhealthy_after,
                               session_timeout=args.session_timeout, allow_open_acl=args.allow_open_acl,
                               health_check=health_check, health_security=security)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m discovery.register", formatter_class=DefaultsHelpFormatter,
        description="Register a teacher endpoint in ZooKeeper while it answers its gRPC health check "
                    "(grpc.health.v1): wait for the first good check, create an ephemeral node, remove it when "
                    "the teacher stops answering, create it again when it recovers or after a ZooKeeper session "
                    "loss. SIGTERM/SIGINT remove the node and exit 0.")
    parser.add_argument("--endpoint", required=True, metavar="HOST:PORT",
                        help="the teacher's address as students should dial it, e.g. 10.0.0.5:9292 "
                             "(not 0.0.0.0)")
    add_zk_arguments(parser)
    tls = parser.add_argument_group("a teacher served over TLS (teachers.serve --tls_cert)")
    tls.add_argument("--tls_ca", default=None, metavar="FILE",
                     help="PEM file of the CA that signed the teacher's certificate: health checks use TLS and the "
                          "node says \"tls\": true, so that students connect with TLS")
    tls.add_argument("--tls_cert", default=None, metavar="FILE",
                     help="client certificate (PEM) for a teacher that requires one (--tls_client_ca)")
    tls.add_argument("--tls_key", default=None, metavar="FILE", help="private key (PEM) of --tls_cert")
    info = parser.add_argument_group("what students learn about the teacher (stored in its node as JSON)")
    info.add_argument("--model", default=None, help="model name, e.g. mnist_cnn")
    info.add_argument("--max_batch_size", type=int, default=None, metavar="N",
                      help="largest batch the teacher accepts")
    info.add_argument("--version", default=None, help="model or teacher version string")
    info.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                      help="any other field; VALUE is parsed as JSON when it can be (repeatable)")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default INFO)")
    return parser


def parse_meta(args: argparse.Namespace) -> dict[str, Any]:
    """``--meta KEY=VALUE`` items as a dict.

    Raises:
        ValueError: an item is not ``KEY=VALUE`` with a non-empty key.
    """
    meta: dict[str, Any] = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--meta {item!r} is not KEY=VALUE")
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    for key in ("model", "max_batch_size", "version"):
        if getattr(args, key) is not None:
            meta[key] = getattr(args, key)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("discovery.kazoo").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    try:
        parse_auth(resolve_auth(args.zk_auth))
        registration = registration_from_args(args, args.endpoint, parse_meta(args))
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("%s: removing the registration", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    registration.start()
    try:
        while not stop.wait(0.2):
            if registration.node.failed.is_set():
                break
    finally:
        registration.stop()
    error = registration.error
    if error is not None:
        logger.error("%s%s", "SQUATTED SERVICE: " if isinstance(error, ServiceSquattedError) else "", error)
        return 1 if isinstance(error, RegistryAuthError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
