#!/usr/bin/env bash
# Create or update ./.venv with karl-verl and everything its CPU tests and dry run need.
# Idempotent: an existing .venv is reused, torch is installed only when 2.13.0 is missing.
# torch goes first: a bare "torch" requirement would otherwise pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${KARL_VENV:-.venv}"
TORCH_VERSION="2.13.0"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"karl-verl needs Python >= 3.10 (3.11 recommended), found {sys.version.split()[0]}")
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip setuptools wheel

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[bootstrap] installing torch==$TORCH_VERSION (CPU)"
  "${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
fi

echo "[bootstrap] installing karl-verl with its test extra"
"${PIP[@]}" install --quiet ".[test]"
"$VENV/bin/karl-verl" info --no-recipes >/dev/null 2>&1 || { "$VENV/bin/karl-verl" info; exit 1; }
echo "[bootstrap] ready: $VENV ($("$VENV/bin/python" -c 'import verl, torch; print("verl", verl.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1))"
