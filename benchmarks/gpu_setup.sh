#!/usr/bin/env bash
# On the lent H200: unpack the vLLM 0.26.0 bundle (../shared/gpu) and install this package into
# /tmp/site. Source it: `source benchmarks/gpu_setup.sh` (builds the CUDA extension unless
# VLLM_SEPLLM_SKIP_CUDA_BUILD=1).
source .gpu/boot.sh
export SEPLLM_COMMIT=${SEPLLM_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
if [ ! -f /tmp/site/.sepllm ]; then
  MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-deps --no-build-isolation --no-index \
    --target /tmp/site . && touch /tmp/site/.sepllm
fi
python3 -c "import vllm_sepllm, vllm; print('vllm', vllm.__version__, 'vllm_sepllm', vllm_sepllm.__version__)"
