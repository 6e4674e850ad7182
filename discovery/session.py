"""One ZooKeeper session (kazoo) that connects in the background, reconnects forever and says what happens.

``ZkSession`` wraps ``kazoo.client.KazooClient``: kazoo's ``KazooRetry`` reconnects with exponential backoff and
jitter (0.1 s doubling to 3 s) and retries commands within a deadline; every state change is logged; subscribers
hear about it. Still disconnected a session timeout after a drop, it forgets the last transaction id it saw,
so that a server whose data was wiped or restored (behind that id, it would refuse us forever) lets it in with a
new session. ``retry_forever`` gives the background threads of discovery the same KazooRetry policy, stoppable.

Example::

    session = ZkSession("127.0.0.1:2181", auth="teacher:secret").start()
    session.wait_connected(10)
    children = session.retry("get_children", "/distill")
    session.close()
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Sequence, Union

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, ZookeeperError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState
from kazoo.retry import InterruptedError as RetryInterrupted  # kazoo's own class, not the builtin
from kazoo.retry import KazooRetry

from .arguments import DEFAULT_SESSION_TIMEOUT, normalize_hosts, parse_auth

logger = logging.getLogger(__name__)

ZK_ERRORS = (KazooException, ZookeeperError, OSError, KazooTimeoutError)
__all__ = ["ZK_ERRORS", "RetryInterrupted", "ZkSession", "retry_forever"]


def retry_forever(stopping: threading.Event, max_delay: float = 5.0) -> KazooRetry:
    """KazooRetry that retries ZooKeeper trouble (connection loss, session expiry, a timed-out answer) forever with
    backoff 0.1 s doubling to ``max_delay`` and +-40% jitter; ``stopping.set()`` ends it with ``RetryInterrupted``
    (kazoo's ``kazoo.retry.InterruptedError``, a KazooException: the builtin ``InterruptedError`` misses it)."""
    retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.4, max_delay=max_delay,
                       sleep_func=stopping.wait, interrupt=stopping.is_set)
    retry.retry_exceptions = retry.retry_exceptions + (KazooTimeoutError,)
    return retry


class ZkSession:
    """One kazoo client that keeps (re)connecting in the background and never gives up.

    ``start()`` returns at once; ``wait_connected(timeout)`` blocks. Subscribers (``subscribe(fn)``) are called
    with the new ``KazooState`` from kazoo's event thread and must not block.

    Args:
        zk_hosts: ``'host:port,host:port'`` or a list of them (ValueError naming a bad one).
        auth: ``'user:password'`` digest identity, or None (ValueError on another form).
        session_timeout: seconds; the server clamps it to its [minSessionTimeout, maxSessionTimeout].
        command_deadline: seconds ``retry()`` keeps retrying one command.
        max_reconnect_delay: the longest wait between two connection attempts, seconds.
    """

    def __init__(self, zk_hosts: Union[str, Sequence[str]], auth: Optional[str] = None,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT, command_deadline: float = 10.0,
                 max_reconnect_delay: float = 3.0):
        self.hosts = normalize_hosts(zk_hosts)
        credentials = parse_auth(auth)
        self.auth_user = credentials[0] if credentials else None
        self.session_timeout = session_timeout
        self.request_timeout = max(2.0, session_timeout)
        connection_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.4,
                                      max_delay=max_reconnect_delay)
        command_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.4, max_delay=2.0,
                                   deadline=command_deadline)
        command_retry.retry_exceptions = command_retry.retry_exceptions + (KazooTimeoutError,)
        auth_data = [("digest", f"{credentials[0]}:{credentials[1]}")] if credentials else None
        self.client = KazooClient(hosts=self.hosts, timeout=session_timeout, connection_retry=connection_retry,
                                  command_retry=command_retry, auth_data=auth_data,
                                  logger=logging.getLogger("discovery.kazoo"))
        self.client.add_listener(self._on_state)
        self._subscribers: list[Callable[[str], None]] = []
        self._connected = threading.Event()
        self._started = False
        self._last_session: Optional[int] = None
        self._stale_timer: Optional[threading.Timer] = None

    def start(self) -> ZkSession:
        if not self._started:
            self._started = True
            logger.info("connecting to ZooKeeper %s (session timeout %.1fs)", self.hosts, self.session_timeout)
            self.client.start_async()
        return self

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.client.connected

    @property
    def session_id(self) -> Optional[int]:
        client_id = self.client.client_id
        return client_id[0] if client_id else None

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._subscribers.append(callback)

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<operation>(...)`` that waits at most ``request_timeout`` for the answer.

        kazoo's blocking calls wait forever for a request that a session expiry dropped from its queue; the
        ``_async`` form with a timeout does not. Raises what kazoo raises, or KazooTimeoutError.
        """
        return getattr(self.client, f"{operation}_async")(*args, **kwargs).get(timeout=self.request_timeout)

    def retry(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """``call`` retried by kazoo's command KazooRetry (backoff, jitter, the command deadline)."""
        return self.client.retry(self.call, operation, *args, **kwargs)

    def close(self) -> None:
        """Close the session (its ephemeral nodes vanish at once) and stop reconnecting."""
        if not self._started:
            return
        self._started = False
        try:
            self.client.stop()
        except ZK_ERRORS as exc:  # already disconnected: nothing to close
            logger.debug("closing ZooKeeper session: %s", exc)
        self._disarm_stale_timer()
        self.client.close()

    # -- a server behind what we saw (wiped, restored from a backup) ---------------------------------------------
    def _arm_stale_timer(self) -> None:
        if self._stale_timer is None and self._started:
            self._stale_timer = threading.Timer(self.session_timeout, self._forget_last_zxid)
            self._stale_timer.daemon = True
            self._stale_timer.start()

    def _disarm_stale_timer(self) -> None:
        timer, self._stale_timer = self._stale_timer, None
        if timer is not None:
            timer.cancel()

    def _forget_last_zxid(self) -> None:
        """Still not connected a session timeout after the connection dropped: forget the last transaction id seen.

        A ZooKeeper server refuses (closes at once) a client that saw a later transaction id (zxid) than its own
        ("Refusing session request for client ... as it has seen zxid ...", ZooKeeperServer.processConnectRequest),
        meant to send it to a more up-to-date member; kazoo offers the same id on every attempt, so after the
        ensemble's data was wiped or restored from a backup it could never connect again. By now our session is
        expired on any ensemble that kept running, and one that was down restores sessions whatever id we offer;
        the only thing lost is the guard against a lagging member, for one connection.
        """
        self._stale_timer = None
        if not self._started or self.connected or not self.client.last_zxid:
            return
        logger.warning("ZooKeeper %s: still unreachable or refusing us %.1fs after the connection dropped; "
                       "forgetting the last transaction id seen (0x%x) in case its data was wiped or restored",
                       self.hosts, self.session_timeout, self.client.last_zxid)
        self.client.last_zxid = 0

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            self._disarm_stale_timer()
            self._log_connected()
            self._connected.set()
        else:
            self._connected.clear()
            self._arm_stale_timer()
            if self._started and state == KazooState.SUSPENDED:
                logger.warning("ZooKeeper %s unreachable; keeping the last known state and reconnecting "
                               "with backoff", self.hosts)
            elif self._started:
                logger.warning("ZooKeeper %s: session lost; reconnecting with a new session", self.hosts)
        for callback in list(self._subscribers):
            try:
                callback(state)
            except Exception:  # noqa: BLE001 - one bad subscriber must not break the others
                logger.exception("ZooKeeper state subscriber failed")

    def _log_connected(self) -> None:
        session = self.session_id
        if self._last_session is not None and session != self._last_session:
            logger.warning("ZooKeeper %s: new session 0x%x (the previous one expired)", self.hosts, session or 0)
        elif self._last_session is not None:
            logger.info("ZooKeeper %s: reconnected, session kept", self.hosts)
        else:
            logger.info("ZooKeeper %s: connected, session 0x%x", self.hosts, session or 0)
        self._last_session = session
