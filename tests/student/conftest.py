"""Fixtures of the student tests on real network links (tests/support/netns.py): each test's namespaces are made
by the fixture and removed after it, even on failure; where they cannot be made here the test is skipped with
the reason (root, iproute2, iptables)."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import pytest

from tests.support.netns import Namespace, iptables_unavailable, namespaces, unavailable


def _namespaces_or_skip(reason: Optional[str]) -> Iterator[Callable[[], Namespace]]:
    if reason:
        pytest.skip(reason)
    with namespaces() as make:
        yield make


@pytest.fixture
def netns():
    """A maker of namespaces, each behind a veth link that can be black-holed (``Namespace``)."""
    yield from _namespaces_or_skip(unavailable())


@pytest.fixture
def slow_netns():
    """Namespaces whose links can also be delayed and made lossy (``Namespace.delay`` / ``lose``: iptables)."""
    yield from _namespaces_or_skip(iptables_unavailable())
