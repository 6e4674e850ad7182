#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for distill-reader: Debian packages (Java + ZooKeeper for the
# discovery tests, Fashion-MNIST for the example's offline fallback, fortunes: the text example's corpus, iproute2 and
# iptables: the network-fault tests' namespaces, latency and loss), then
# one virtualenv per supported PaddlePaddle line, each with the project installed in editable mode with the cpu extra (paddlepaddle):
#   .venv          paddle 2.6.2
#   .venv-paddle3  the newest paddle 3
# PADDLE_LINES="2 3" (default) picks which of the two to set up; PADDLE_WHEEL=paddlepaddle-gpu installs the GPU
# wheel (the gpu extra) instead. Paddle is not a requirement of the package (see setup.py).
# Idempotent: a second run only checks.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS default: test,examples)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,examples}"

apt_packages=(python3-venv libzookeeper-java openjdk-17-jre-headless dataset-fashion-mnist fortunes iproute2 iptables)
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
  echo "[setup] $dir: pip install '$spec' -e .[$paddle_extra,$extras]"
  "$dir/bin/python" -m pip install -q "$spec" -e ".[$paddle_extra,$extras]"
}

wheel="${PADDLE_WHEEL:-paddlepaddle}"
case "$wheel" in
  paddlepaddle) paddle_extra=cpu ;;
  paddlepaddle-gpu) paddle_extra=gpu ;;
  *) echo "[setup] PADDLE_WHEEL must be paddlepaddle or paddlepaddle-gpu, not '$wheel'" >&2; exit 2 ;;
esac
for line in ${PADDLE_LINES:-2 3}; do
  case "$line" in
    2) setup_venv .venv "$wheel==2.6.2" ;;
    3) setup_venv .venv-paddle3 "$wheel>=3,<4" ;;
    *) echo "[setup] unknown paddle line '$line' in PADDLE_LINES (use 2 and/or 3)" >&2; exit 2 ;;
  esac
done
