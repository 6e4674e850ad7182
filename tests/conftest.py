"""Test configuration: shared fixtures live in tests/support/ and are loaded as plugins."""
import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

pytest_plugins = ["tests.support.teacher", "tests.support.zookeeper", "tests.support.skip_location"]
