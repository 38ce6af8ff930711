#!/usr/bin/env bash
# Install a built attnblocks wheel into a fresh virtual environment and test it as a user
# would get it: first with its runtime dependencies only (every module must import),
# then with the test and onnx extras, running the whole test suite and the docstring
# examples against the INSTALLED package, from a copy of the repository without
# attnblocks/ (so the source tree cannot be imported by accident).
#
# Usage: bash .ci/test_installed.sh PYTHON CONSTRAINTS WHEEL   (from the repository root)
set -euo pipefail
PYTHON="$1" CONSTRAINTS="$(realpath "$2")" WHEEL="$(realpath "$3")"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" --version

echo "-- the wheel with its runtime dependencies only"
"$PY" -m pip install -q -c "$CONSTRAINTS" "$WHEEL"
(cd "$WORK" && "$PY" - <<'PYEOF'
import importlib, pkgutil, sys, sysconfig
from pathlib import Path

import attnblocks
import torch

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(attnblocks.__file__).resolve()
assert where.is_relative_to(site), f"attnblocks imported from {where}, not from {site}"
modules = [m.name for m in pkgutil.walk_packages(attnblocks.__path__, prefix="attnblocks.")]
for name in modules:
    importlib.import_module(name)
for name in ("attnblocks.blocks", "attnblocks.surgery", "attnblocks.inspect", "attnblocks.plot"):
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists missing names {missing}"
leaked = sorted({"matplotlib", "torchvision", "timm", "tqdm"} & set(sys.modules))
assert not leaked, f"importing attnblocks pulled in optional packages {leaked}"
print(f"attnblocks {attnblocks.__version__} from {where.parent}, torch {torch.__version__}: "
      f"{len(modules) + 1} modules import with torch and einops only")
PYEOF
)

echo "-- the test suite and docstring examples against the installed wheel"
"$PY" -m pip install -q -c "$CONSTRAINTS" "$WHEEL[test,onnx]"
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [[ $f != attnblocks/* && -f $f ]]; then cp --parents -- "$f" "$WORK/src"; fi
done
cd "$WORK/src"
test ! -e attnblocks
"$PY" -c "import attnblocks, sys; print('tests import attnblocks from', attnblocks.__file__)"
"$PY" -m pytest -p no:cacheprovider tests --pyargs attnblocks
