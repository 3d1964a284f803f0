#!/usr/bin/env bash
# On the H200 (after `source benchmarks/gpu_setup.sh`): `vllm bench throughput` and
# `benchmarks/throughput.py --prompts vllm-random` on the same W0-shaped random workload, for
# FLASH_ATTN and SEPLLM a4/s64/w256. Same prompts (vLLM's own sampler, same seed), same engine
# settings; the two tools' figures should agree. Writes JSON to $1.
set -u
out=${1:-/tmp/bench-agree}; mkdir -p "$out"
model=$(python3 -c "
from pathlib import Path; import tempfile
from benchmarks.common import LLAMA3_8B, make_dummy_model
print(make_dummy_model(Path(tempfile.mkdtemp()) / 'llama3-8b', Path('.gpu/tok'), LLAMA3_8B))")
common=(--model "$model" --load-format dummy --dataset-name random --random-input-len 2077
        --random-output-len 512 --random-range-ratio 0 --num-prompts 256 --max-model-len 2605
        --max-num-seqs 1024 --no-enable-prefix-caching --seed 0)
for backend in FLASH_ATTN SEPLLM; do
  extra=(); [ $backend = SEPLLM ] && extra=(--additional-config
    '{"sepllm": {"mode": "sepllm", "num_sinks": 4, "sep_cap": 64, "window": 256}}')
  python3 -m vllm.entrypoints.cli.main bench throughput "${common[@]}" --attention-backend $backend \
    "${extra[@]}" --output-json "$out/h200_w0_vllm_bench_${backend,,}.json" 2>&1 \
    | grep -v "it/s\]" | grep -i "throughput\|error\|sepllm\|Traceback" | tail -8
  echo "vllm bench $backend rc=${PIPESTATUS[0]}"
done
python3 benchmarks/throughput.py --workload W0 --prompts vllm-random --model "$model" --no-progress \
  --runs FLASH_ATTN SEPLLM:a4s64w256 --out "$out/h200_w0_vllm_random.json" 2>&1 \
  | grep -v "it/s\]" | tail -8
