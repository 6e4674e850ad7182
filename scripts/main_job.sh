#!/usr/bin/env bash
# The README's main job: set up a fresh machine (scripts/setup.sh), then run MNIST service distillation
# locally with a fixed teacher (no ZooKeeper): train the teacher, export and serve it on a free port of
# 127.0.0.1, train students alone and with distillation in two settings (all labels; few labels + transfer set)
# for seeds 1, 2, 3, stop the server, print the results table (also out/mnist_example/results.md) and save the
# plot (out/mnist_example/accuracy.png). DISTILL_OFFLINE=1 (or --offline) skips the MNIST download attempt.
# Extra arguments go to examples/mnist/local_flow.py (see its --help), e.g. --seeds 1,2,3 or --data_dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PADDLE_LINES="${PADDLE_LINES:-2}" bash scripts/setup.sh test,examples  # the paddle 2.6.2 venv (.venv)
exec .venv/bin/python examples/mnist/local_flow.py "$@"
