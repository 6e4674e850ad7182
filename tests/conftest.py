"""Test configuration: shared fixtures live in tests/support/ and are loaded as plugins."""
import os

import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)
import pytest

pytest_plugins = ["tests.support.teacher", "tests.support.zookeeper", "tests.support.skip_location"]

# Test files that need no paddle at all (parsers, fuzzing, ZooKeeper recipes, batcher, knowledge files): marked
# ``paddle_free``. scripts/test.sh runs them once with paddle hidden (tests/support/no_paddle, which proves the
# claim) and runs the rest once per paddle line.
PADDLE_FREE_FILES = frozenset({
    "test_assigner.py", "test_batcher.py", "test_codec_config.py", "test_discovery_nodes.py", "test_endpoints.py",
    "test_fuzz.py", "test_keepalive.py", "test_knowledge_files.py", "test_knowledge_index.py",
    "test_knowledge_untrusted.py", "test_padding.py", "test_reader_pool.py", "test_rebalance.py", "test_routing.py",
    "test_share.py", "test_structure.py", "test_untrusted_inputs.py", "test_reconciler.py", "test_worker_messages.py",
    "test_student_grace.py",
})


def pytest_ignore_collect(collection_path, config):
    """With paddle hidden (tests/support/no_paddle), the files outside PADDLE_FREE_FILES are not even imported."""
    if os.environ.get("DISTILL_PADDLE_HIDDEN") and collection_path.suffix == ".py" \
            and collection_path.name.startswith("test_") and collection_path.name not in PADDLE_FREE_FILES:
        return True
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "lod: needs a LoD model (paddle 2.x); deselected on paddle 3, where PIR has no "
                                       "LoD tensors (each such test has a padded counterpart that runs there)")
    config.addinivalue_line("markers", "one_line: the same on every paddle line, so scripts/test.sh runs these on "
                                       "its last paddle line only: the student under real network faults, chaos, "
                                       "gray failures and ZooKeeper changes, with real teachers (each line's "
                                       "teacher server has its own tests), and the teacher server's "
                                       "--worker_io threads variants (the default, loop, runs on every line)")
    config.addinivalue_line("markers", "paddle_free: needs no paddle (conftest.PADDLE_FREE_FILES); scripts/test.sh "
                                       "runs these once, with paddle hidden, and the others on each paddle line")


@pytest.hookimpl(tryfirst=True)   # before -m reads the markers
def pytest_collection_modifyitems(config, items):
    """Mark the tests of PADDLE_FREE_FILES ``paddle_free``; on paddle 3, deselect (not skip) the tests marked
    ``lod``: LoD models cannot exist there."""
    for item in items:
        if item.path.name in PADDLE_FREE_FILES:
            item.add_marker("paddle_free")
    lod_only = [item for item in items if item.get_closest_marker("lod")]
    if not lod_only:
        return
    from tests.support.lod_models import lod_available

    if lod_available():
        return
    config.hook.pytest_deselected(items=lod_only)
    items[:] = [item for item in items if not item.get_closest_marker("lod")]
    config._lod_deselected = len(lod_only)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_lod_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} LoD-model test(s) deselected: paddle 3's PIR has no LoD tensors (their "
                                    f"padded counterparts ran)")
