#!/usr/bin/env bash
# On the H200 (after `source benchmarks/gpu_setup.sh`): SEPLLM through vLLM's own command
# lines (`python3 -m vllm.entrypoints.cli.main` is the `vllm` console script; the H200 bundle
# has no console scripts). 1) `vllm serve --attention-backend SEPLLM`: a completion and a chat request;
# 2) `vllm bench throughput --attention-backend SEPLLM`. Writes responses and logs to $1.
set -u
out=${1:-/tmp/cli-check}; mkdir -p "$out"
model=$(python3 -c "
from pathlib import Path; import tempfile
from benchmarks.common import LLAMA3_8B, make_dummy_model
print(make_dummy_model(Path(tempfile.mkdtemp()) / 'llama3-8b', Path('.gpu/tok'), LLAMA3_8B))")

python3 -m vllm.entrypoints.cli.main serve "$model" --load-format dummy --attention-backend SEPLLM --port 8011 \
  --additional-config '{"sepllm": {"window": 128, "sep_cap": 32}}' --max-model-len 4096 \
  > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 240); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}" \
  > "$out/completion.json"
curl -s localhost:8011/v1/chat/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 16}" \
  > "$out/chat.json"
kill $pid; wait $pid 2>/dev/null
echo "completion: $(head -c 400 "$out/completion.json")"
echo "chat: $(head -c 400 "$out/chat.json")"
grep -m3 "sepllm" "$out/serve.log"

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
python3 -m vllm.entrypoints.cli.main bench throughput --model "$model" --load-format dummy --attention-backend SEPLLM \
  --input-len 1024 --output-len 128 --num-prompts 128 --max-model-len 2048 \
  --output-json "$out/bench_throughput_sepllm.json" > "$out/bench.log" 2>&1
tail -4 "$out/bench.log"
