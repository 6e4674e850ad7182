"""Register a teacher in ZooKeeper only while it answers its gRPC health check.

Used by the register script (``python -m discovery.register``) and by ``teachers.serve --zk ... --service ...``.

Rules:
- wait until the endpoint answers ``grpc.health.v1.Health/Check`` (service ``""``) with SERVING, then create the
  ephemeral sequential node ``<root>/<service>/teacher-NNNNNNNNNN`` holding JSON
  ``{"endpoint", "host", "pid", ...meta}``. An endpoint without the health service (UNIMPLEMENTED: a real Paddle
  Serving server) counts as answering;
- ``unhealthy_after`` failed checks in a row remove the node; the next good check registers it again. A teacher
  that keeps flapping waits longer each time before it comes back (doubling up to ``max_recover_delay``, with
  jitter), and is forgiven after ``stable_after`` seconds of good health;
- a ZooKeeper session loss is followed by a new session and a new node (see ``discovery.ephemeral.EphemeralNode``);
- ``stop()`` removes the node and closes the session.

Example::

    registration = TeacherRegistration("127.0.0.1:2181", "mnist_teacher", "127.0.0.1:9292",
                                       meta={"model": "mnist_cnn", "max_batch_size": 256})
    registration.start()
    registration.wait_registered(30)
    ...
    registration.stop()
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Optional, Sequence, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distill_base.backoff import backoff_delay
from distill_base.client_security import ClientSecurity

from .acls import ensure_service, teacher_node_acl
from .arguments import AUTH_ENV, DEFAULT_ROOT, DEFAULT_SESSION_TIMEOUT, TEACHER_PREFIX, ServicePaths, validate_endpoint
from .ephemeral import EphemeralNode
from .reconciler import Reconciler
from .session import ZkSession

logger = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Without these, a channel to a teacher that was down waits up to 2 minutes before trying again.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class GrpcHealthProbe:
    """Callable: True when ``endpoint`` answers the standard gRPC health check with SERVING (or has none)."""

    def __init__(self, endpoint: str, timeout: float = 1.0, service: str = "",
                 security: Optional[ClientSecurity] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.service = service
        self.security = security or ClientSecurity()   # TLS for a teacher served with --tls_cert
        self.last_error = ""
        self._channel: Optional[grpc.Channel] = None

    def __call__(self) -> bool:
        if self._channel is None:
            self._channel = self.security.grpc_channel(self.endpoint, list(_CHANNEL_OPTIONS))
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return True     # a server without the health service (real Paddle Serving) that answers
            self.last_error = f"gRPC {exc.code().name}: {exc.details()}"
            self.close()        # a fresh channel next time: no reconnect backoff after the teacher returns
            return False
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            return True
        self.last_error = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
        return False

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class TeacherRegistration:
    """Keep ``endpoint`` registered under ``<root>/<service>`` exactly while it answers its health check.

    Args:
        zk_hosts: ``'host:port,host:port'`` or a list of them.
        service: the service name students ask for (``set_dynamic_teacher(..., teacher_service_name)``).
        endpoint: the teacher's ``host:port`` as students should dial it.
        meta: extra JSON fields for the node (``model``, ``max_batch_size``, ``version``, ...).
        root: the ZooKeeper folder of all services.
        auth: ``'user:password'`` digest identity; when set, only it may create or delete under the service
            (see ``discovery.acls``).
        allow_open_acl: without ``auth`` every node is open: anyone may register a teacher that students then
            feed. Refused (ValueError) unless this is True.
        health_interval: seconds between health checks.
        health_timeout: seconds one health check may take.
        unhealthy_after: failed checks in a row before the node is removed.
        session_timeout: ZooKeeper session timeout in seconds (see discovery.arguments.DEFAULT_SESSION_TIMEOUT).
        health_check: replaces the gRPC health probe (a callable returning True when healthy).
        health_security: TLS files for the health probe of a teacher that serves TLS (``ClientSecurity``);
            with TLS the node says ``"tls": true``, so that students connect the right way.
    """

    def __init__(self, zk_hosts: Union[str, Sequence[str]], service: str, endpoint: str,
                 meta: Optional[dict] = None, root: str = DEFAULT_ROOT, auth: Optional[str] = None,
                 health_interval: float = 1.0, health_timeout: float = 1.0, unhealthy_after: int = 2,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT, max_recover_delay: float = 30.0,
                 stable_after: float = 60.0, health_check: Optional[Callable[[], bool]] = None,
                 health_security: Optional[ClientSecurity] = None,
                 allow_open_acl: bool = False):
        """Check the arguments.

        Raises:
            ValueError: no ZooKeeper identity and no ``allow_open_acl``; ``health_interval``/``health_timeout`` not > 0
                or ``unhealthy_after`` < 1.
        """
        if not auth and not allow_open_acl:
            raise ValueError(f"no ZooKeeper identity: set {AUTH_ENV}=user:password (or --zk_auth) so that only this "
                             "identity may register teachers, or pass --allow_open_acl to register with an open ACL "
                             "(anyone who reaches ZooKeeper could then register a teacher that students trust)")
        if not auth:
            logger.warning("registering with an open ACL (--allow_open_acl): anyone who reaches ZooKeeper may "
                           "register or delete teachers of this service")
        if health_interval <= 0 or health_timeout <= 0 or unhealthy_after < 1:
            raise ValueError("health_interval and health_timeout must be > 0 and unhealthy_after >= 1")
        self.endpoint = validate_endpoint(endpoint)
        self.paths = ServicePaths(root, service)
        self.auth = auth
        self.health_interval = health_interval
        self.unhealthy_after = unhealthy_after
        self.max_recover_delay = max_recover_delay
        self.stable_after = stable_after
        self._probe = health_check or GrpcHealthProbe(self.endpoint, timeout=health_timeout,
                                                      security=health_security)
        self.session = ZkSession(zk_hosts, auth=auth, session_timeout=session_timeout)
        data = {"endpoint": self.endpoint, "host": socket.gethostname(), "pid": os.getpid()}
        data.update(meta or {})
        data["endpoint"] = self.endpoint
        if health_security is not None and health_security.tls:
            data["tls"] = True
        self.node = EphemeralNode(self.session, self.paths.service_path, TEACHER_PREFIX, data,
                                  acl=teacher_node_acl(auth),
                                  ensure_parent=lambda: ensure_service(self.session, self.paths, auth),
                                  what=f"teacher {self.endpoint}")
        self.healthy = False
        self._failures = 0                       # health checks failed in a row
        self._flaps = 0                          # removals without a stable stretch of good health since
        self._not_before = 0.0                   # monotonic time before which the node is not re-registered
        self._healthy_since: Optional[float] = None
        self._thread = Reconciler(f"health-{self.endpoint}", self._health_round, interval=health_interval)
        self._started = False

    # -- public API ------------------------------------------------------------------------------------
    def start(self) -> TeacherRegistration:
        """Start health checks and the ZooKeeper session in the background; returns at once."""
        if self._started:
            return self
        self._started = True
        logger.info("teacher %s: waiting for its health check before registering in %s", self.endpoint,
                    self.paths.service_path)   # before the health thread, whose first line may follow at once
        self.session.start()
        self.node.start()
        self._thread.start(at_once=True)
        return self

    def stop(self) -> None:
        """Remove the node, close the session and stop health checks."""
        if not self._started:
            return
        self._started = False
        self._thread.stop(join=5)
        self.node.stop(remove=True)
        self.session.close()
        if isinstance(self._probe, GrpcHealthProbe):
            self._probe.close()

    @property
    def registered(self) -> bool:
        return self.node.created.is_set()

    @property
    def path(self) -> Optional[str]:
        """The teacher's node path while registered."""
        return self.node.path

    @property
    def error(self) -> Optional[Exception]:
        """A final error (RegistryAuthError) that stopped the registration, else None."""
        return self.node.error

    def wait_registered(self, timeout: float) -> str:
        """Block until the node exists; returns its path. Raises the registration's final error, or
        TimeoutError naming the endpoint and what is missing.

        Raises:
            TimeoutError: the node does not exist after ``timeout`` seconds (names the endpoint and what is missing).
            DiscoveryError: the registration failed for good (its final error, e.g. ServiceSquattedError,
                RegistryAuthError).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node.failed.is_set() and self.node.error is not None:
                raise self.node.error
            if self.node.created.wait(0.05) and self.node.path:
                return self.node.path
        reason = ("ZooKeeper not connected" if not self.session.connected else
                  "teacher not answering its health check" if not self.healthy else "node not created yet")
        raise TimeoutError(f"teacher {self.endpoint} not registered in {self.paths.service_path} "
                           f"after {timeout}s: {reason}")

    def __enter__(self) -> TeacherRegistration:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- health checks (the reconciler's round: at start, then every health_interval) ----------------------------
    def _health_round(self) -> None:
        try:
            ok = bool(self._probe())
        except Exception as exc:  # noqa: BLE001 - a broken probe means "not healthy", not a failed round
            logger.warning("teacher %s: health check raised %s", self.endpoint, exc)
            ok = False
        now = time.monotonic()
        self.healthy = ok
        if ok:
            self._failures = 0
            self._healthy_since = self._healthy_since or now
            if self.node.wanted and self._flaps and now - self._healthy_since >= self.stable_after:
                self._flaps = 0
            if not self.node.wanted and now >= self._not_before:
                logger.info("teacher %s answers its health check: registering", self.endpoint)
                self.node.set_wanted(True)
            return
        self._healthy_since = None
        self._failures += 1
        if self.node.wanted and self._failures >= self.unhealthy_after:
            self._flaps += 1
            # the project's one backoff rule (jittered: teachers flapping together come back apart)
            delay = 0.0 if self._flaps == 1 else backoff_delay(self._flaps, self.health_interval,
                                                                self.max_recover_delay)
            self._not_before = now + delay
            logger.warning("teacher %s failed %d health checks (%s): removing its node%s", self.endpoint,
                           self._failures, getattr(self._probe, "last_error", ""),
                           f"; it may return after {delay:.0f}s of good health" if delay else "")
            self.node.set_wanted(False)
