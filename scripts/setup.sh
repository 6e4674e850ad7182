#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for distill-reader: Debian packages (Java + ZooKeeper for the
# discovery tests, Fashion-MNIST for the example's offline fallback, fortunes: the text example's corpus), then a
# virtualenv in .venv with the project installed in editable mode. Idempotent: a second run only checks.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS default: test,examples)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,examples}"

apt_packages=(python3-venv libzookeeper-java openjdk-17-jre-headless dataset-fashion-mnist fortunes)
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
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "[setup] pip install -e .[$extras]"
.venv/bin/python -m pip install -q -e ".[$extras]"
