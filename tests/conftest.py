"""Test configuration: shared fixtures live in tests/support/ and are loaded as plugins."""
import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

pytest_plugins = ["tests.support.teacher", "tests.support.zookeeper", "tests.support.skip_location"]


def pytest_configure(config):
    config.addinivalue_line("markers", "lod: needs a LoD model (paddle 2.x); deselected on paddle 3, where PIR has no "
                                       "LoD tensors (each such test has a padded counterpart that runs there)")


def pytest_collection_modifyitems(config, items):
    """On paddle 3, deselect (not skip) the tests marked ``lod``: LoD models cannot exist there."""
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
