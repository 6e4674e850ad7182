"""A pytest plugin: a test skipped by a helper (``pytest.skip`` called in tests/support/...) is reported at the test's
own file and line, with the helper's place in the reason, instead of under the helper's line for every test it
skips (issue 24)."""
from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3):
        return
    path, lineno, reason = report.longrepr
    if str(path) != str(item.path):
        where = f"{item.nodeid}; skipped in {path}:{lineno}"
        report.longrepr = (str(item.path), item.location[1] + 1, f"{reason} [{where}]")
