#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint with ruff, and run the whole test suite with real teacher servers,
# real worker processes and a real ZooKeeper (started by the tests on loopback unless
# DISTILL_ZK_HOSTS points at an existing ensemble). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,examples
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] pytest"
exec .venv/bin/python -m pytest "$@"
