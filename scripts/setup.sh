#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for distill-reader: Debian packages (Java + ZooKeeper for the
# discovery tests, Fashion-MNIST for the example's offline fallback), then one virtualenv per supported
# PaddlePaddle line, each with the project installed in editable mode:
#   .venv          paddle 2.6.2   (PADDLE2_SPEC, default "paddlepaddle==2.6.2")
#   .venv-paddle3  newest paddle 3 (PADDLE3_SPEC, default "paddlepaddle>=3,<4")
# PADDLE_LINES="2 3" (default) picks which of the two to set up. Paddle itself is not a requirement of the
# package (see setup.py): it is installed here by its spec, next to the project's extras.
# Idempotent: a second run only checks.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS default: test,examples)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,examples}"

apt_packages=(python3-venv libzookeeper-java openjdk-17-jre-headless dataset-fashion-mnist)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "[setup] installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"

# setup_venv DIR PADDLE_SPEC: a virtualenv in DIR with PADDLE_SPEC and the project (editable) with $extras.
setup_venv() {
  local dir="$1" spec="$2"
  if [ ! -x "$dir/bin/python" ]; then
    echo "[setup] creating $dir with $($python --version)"
    "$python" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --upgrade pip
  echo "[setup] $dir: pip install '$spec' -e .[$extras]"
  "$dir/bin/python" -m pip install -q "$spec" -e ".[$extras]"
}

for line in ${PADDLE_LINES:-2 3}; do
  case "$line" in
    2) setup_venv .venv "${PADDLE2_SPEC:-paddlepaddle==2.6.2}" ;;
    3) setup_venv .venv-paddle3 "${PADDLE3_SPEC:-paddlepaddle>=3,<4}" ;;
    *) echo "[setup] unknown paddle line '$line' in PADDLE_LINES (use 2 and/or 3)" >&2; exit 2 ;;
  esac
done
