#!/usr/bin/env bash
# The README's main job: set up a fresh machine (scripts/setup.sh), then run MNIST service distillation
# locally with a fixed teacher (no ZooKeeper): train the teacher, export and serve it on a free port of
# 127.0.0.1, train the student alone and with distillation (same epochs and seed), stop the server, print
# the results table and save the accuracy plot (out/mnist_example/accuracy.png).
# Extra arguments go to examples/mnist/local_flow.py (see its --help), e.g. --seeds 1,2,3 or --data_dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PADDLE_LINES="${PADDLE_LINES:-2}" bash scripts/setup.sh test,examples  # the paddle 2.6.2 venv (.venv)
exec .venv/bin/python examples/mnist/local_flow.py "$@"
