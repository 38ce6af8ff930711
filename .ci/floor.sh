#!/usr/bin/env bash
# The floor: the oldest Python (requires-python) with the oldest torch / torchvision pair
# (.ci/floor-constraints.txt) that attnblocks supports, in a fresh virtual environment,
# with the built wheel installed and the whole test suite run against it.
#
# Usage: bash .ci/floor.sh [WHEEL]   (from anywhere; builds the wheel when none is given)
# FLOOR_PYTHON picks the interpreter; by default python3.10, found on PATH or in pyenv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_floor_python() {
    if command -v python3.10 >/dev/null && python3.10 --version >/dev/null 2>&1; then
        command -v python3.10
    elif command -v pyenv >/dev/null && compgen -G "$(pyenv root)/versions/3.10.*/bin/python3.10" >/dev/null; then
        compgen -G "$(pyenv root)/versions/3.10.*/bin/python3.10" | sort -V | tail -n 1
    fi
}
FLOOR_PYTHON="${FLOOR_PYTHON:-$(find_floor_python)}"
if [ -z "$FLOOR_PYTHON" ]; then
    echo "floor.sh: no python3.10 here (set FLOOR_PYTHON=/path/to/python3.10)" >&2
    exit 1
fi

WHEEL="${1:-}"
if [ -z "$WHEEL" ]; then
    DIST="$(mktemp -d)"
    trap 'rm -rf "$DIST"' EXIT
    python3 -m pip wheel -q --no-deps -w "$DIST" .
    WHEEL="$(compgen -G "$DIST/attnblocks-*.whl")"
fi

bash .ci/test_installed.sh "$FLOOR_PYTHON" .ci/floor-constraints.txt "$WHEEL"
