"""The assigner's election lock: kazoo's ``Lock`` recipe with a retry that follows the session.

kazoo's ``Lock`` retries its contender's ZooKeeper calls (through connection loss and session expiry) with a
``KazooRetry`` of its own: backoff doubling to 60 s, with no way to stop it. While a session is expired and
not yet re-established every call fails at once, so a contender that waited out a few seconds of that
(a ZooKeeper restarted or wiped on a loaded machine) then slept about as long again after its new session was
up, before it looked at its predecessor: the service could go that long without an assigner (issue 25:
takeover within 2 s). ``ContenderLock`` is the same recipe with discovery's retry policy
(``discovery.session.retry_forever``): backoff to at most ``max_delay`` (0.5 s, +-40 % jitter), and a retry's wait
ends with ``stopping``.

Example::

    lock = ContenderLock(session.client, paths.assigner_lock_path, "host-42", stopping)
    if lock.acquire():      # True: this contender leads; False: stopping ended a retry
        ...
    lock.cancel()           # (another thread) ends a wait for the predecessor: acquire raises CancelledError
"""
from __future__ import annotations

import threading

from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock

from .session import retry_forever

__all__ = ["ContenderLock", "RECONTEND_MAX_DELAY"]

RECONTEND_MAX_DELAY = 0.5   # seconds: the longest a contender waits between two tries of a failing call


class ContenderLock(Lock):
    """kazoo's ``Lock`` (one ephemeral sequential contender node, each watching its predecessor) whose retries back
    off to at most ``max_delay`` seconds (times the jitter) and end once ``stopping`` is set: ``acquire()`` then
    removes its contender node and returns False (kazoo's Lock returns False when its retry gives up). A wait for
    the predecessor is not a retry: ``cancel()`` ends it (``CancelledError``), as ``Assigner.stop`` does."""

    def __init__(self, client: KazooClient, path: str, identifier: str, stopping: threading.Event,
                 max_delay: float = RECONTEND_MAX_DELAY):
        super().__init__(client, path, identifier)
        self._retry = retry_forever(stopping, max_delay)   # the recipe's own retry (kazoo 2.x keeps it here)
