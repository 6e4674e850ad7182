#!/usr/bin/env bash
# Local debugging with a fixed teacher, step by step (the seed's run.sh, made self-contained):
#   1. train the teacher CNN and save it as a serving model (mnist_model/ + serving_client/),
#   2. serve it with teachers.serve on 127.0.0.1:$PORT in the background,
#   3. train the student MLP with the teacher's soft labels (DistillReader, fixed teacher),
#   4. stop the server (also on error or Ctrl-C).
# Environment: PYTHON (default python), PORT (9292), EPOCHS (student, 5), TEACHER_EPOCHS (3),
# DATA_DIR (MNIST IDX folder; default: download, else Fashion-MNIST), WORKDIR (default ../../out/mnist_run),
# NPROC (trainers; >1 runs the student under paddle.distributed.launch).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
PYTHON="${PYTHON:-python}"
PORT="${PORT:-9292}"
EPOCHS="${EPOCHS:-5}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-3}"
NPROC="${NPROC:-1}"
WORKDIR="${WORKDIR:-$repo/out/mnist_run}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" GLOG_minloglevel="${GLOG_minloglevel:-2}"
data_args=()
if [ -n "${DATA_DIR:-}" ]; then data_args=(--data_dir "$DATA_DIR"); fi
mkdir -p "$WORKDIR" && cd "$WORKDIR"

# 1. teacher -> mnist_model/ (server folder) and serving_client/ (client config)
"$PYTHON" "$here/train_with_fleet.py" --save_serving_model True --epochs "$TEACHER_EPOCHS" "${data_args[@]}"

# 2. serve it (the seed: python -m paddle_serving_server_gpu.serve --model mnist_model --thread 4 --port 9292
#    --mem_optim True --gpu_ids 0; add --gpu_ids 0 with the GPU wheel)
"$PYTHON" -m teachers.serve --model mnist_model --thread 4 --port "$PORT" --host 127.0.0.1 --mem_optim True &
serving_pid=$!
stop_server() {
  if kill -0 "$serving_pid" 2>/dev/null; then
    kill -TERM "$serving_pid" 2>/dev/null || true
    wait "$serving_pid" 2>/dev/null || true
  fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM
"$PYTHON" - "$PORT" <<'PY'
import sys, time
from distill_reader.client import TeacherClient
client = TeacherClient(f"127.0.0.1:{sys.argv[1]}", "serving_client")
deadline = time.monotonic() + 120
while not client.health(timeout=1.0):
    if time.monotonic() > deadline:
        sys.exit(f"teacher on port {sys.argv[1]} not healthy after 120 s")
    time.sleep(0.3)
PY
echo "teacher serving on 127.0.0.1:$PORT (pid $serving_pid)"

# 3. student with distillation from the fixed teacher
launcher=("$PYTHON")
if [ "$NPROC" -gt 1 ]; then launcher=("$PYTHON" -m paddle.distributed.launch --nproc_per_node "$NPROC"); fi
"${launcher[@]}" "$here/train_with_fleet.py" --use_distill_service True --distill_teachers "127.0.0.1:$PORT" \
  --epochs "$EPOCHS" "${data_args[@]}"
# 4. the EXIT trap stops the server
