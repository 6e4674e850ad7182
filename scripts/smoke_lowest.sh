#!/usr/bin/env bash
# Install distill-reader at the LOWEST versions setup.py admits (every install_requires floor pinned with ==:
# grpcio, grpcio-health-checking, protobuf, numpy, requests, ...) into its own small venv (.venv-lowest, no
# paddle) and run scripts/smoke_lowest.py: imports (the committed generated gRPC code refuses an older grpcio
# than the tools that made it), a client/server round trip and one DistillReader epoch. Run by scripts/test.sh.
# Fast with pip's cache warm (the venv is kept between runs; the package itself is reinstalled each time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
venv=.venv-lowest
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
constraints="$venv/lowest-constraints.txt"
"$venv/bin/python" - setup.py > "$constraints" <<'PY'
import ast, sys
from pip._vendor.packaging.requirements import Requirement
tree = ast.parse(open(sys.argv[1]).read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
requires = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))
for text in requires:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate():
        continue  # a floor for another Python
    floors = [s.version for s in req.specifier if s.operator == ">="]
    if not floors:
        sys.exit(f"setup.py: {text!r} has no >= floor to test")
    print(f"{req.name}=={floors[0]}")
PY
echo "[smoke_lowest] $(tr '\n' ' ' < "$constraints")"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --prefer-binary -c "$constraints")
"${pip[@]}" .                                   # the floors and the rest of install_requires
"${pip[@]}" --force-reinstall --no-deps .       # this tree's code, also when the version number did not move
repo="$PWD"
cd "${TMPDIR:-/tmp}" && "$repo/$venv/bin/python" "$repo/scripts/smoke_lowest.py"   # the installed package
