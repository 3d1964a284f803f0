#!/usr/bin/env bash
# One device call on the lent H200(s): set up (bundle + CUDA extension), then the named steps.
#   bash benchmarks/h200_run.sh STEP...      (logs and JSON under $OUT; see benchmarks/README.md)
# Steps: ktests (GPU kernel tests), kbench (kernel benchmarks), startup (an engine's start-up
# timings, SEPLLM and FLASH_ATTN), w0|w1|w2 (throughput pairs on one
# GPU, FLASH_ATTN vs SEPLLM; w1/w2: W_RUNS, W_ARGS, W_S), w0x2|w1x2|w2x2 (the pair's two engines
# at once, one per GPU, on the 2-GPU machine), cli (serve + chat + bench through vLLM's CLI),
# tp2 (tensor parallel 2 token check), w1tp2 (W1 pair at tensor parallel 2), stream_gpu1 (the
# 4M-token PE-shift stream on GPU 1, in the background; wait_bg waits), agree (vllm bench vs throughput.py, GPU 0), pytest (GPU tests,
# PYTEST_ARGS), timeline_x2 (decode-step timeline, FLASH_ATTN vs SEPLLM, profile_step.py --timeline),
# host (scheduler host time per decode step, benchmarks/host_step.py), timeline (the same on GPU 0
# alone: TL_* variables, TL_TREE an older checkout for before/after), pytest_gpu1 (PYTEST1_ARGS
# on GPU 1 in the background; wait_bg waits), prefix_light|prefix_heavy (prefix-cached serving,
# `vllm serve` + `vllm bench serve`, FLASH_ATTN vs SEPLLM, benchmarks/prefix_serve.sh; PREFIX_S each),
# families (WF pair FLASH_ATTN vs SEPLLM:a4s64w256c356 per model shape of common.SHAPES, GPU 0,
# --fast-start, one after the other: FAMILIES shapes, FAM_S seconds each, FAM_KV_BYTES of KV;
# about 2-3 shapes fit one device call), fp8pair (the same pair, Llama-3.1-8B, fp8 KV cache),
# soak (benchmarks/soak.py on GPU 0: 1,200 mixed SepLLM requests, 10% aborted, a KV pool that forces
# preemption, async scheduling + full CUDA graphs; SOAK_S seconds in all (default 500: the script's
# own deadline is SOAK_S - 30, then SIGTERM, then SIGKILL 20 s later), SOAK_ARGS more flags;
# writes $OUT/h200_soak.json and $OUT/soak.log), v2check (benchmarks/v2_check.py: V1 vs V2 model
# runner, greedy tokens; V2_S, V2_ARGS), w2runner (W2 throughput, SEPLLM c356 on V1 then V2, no
# replay; RUNNER_RUNS, RUNNER_ARGS, W_S), serve (benchmarks/serve.py: goodput at the latency SLOs
# under vllm serve, FLASH_ATTN vs SEPLLM over a rate sweep; SERVE_* variables, see the step),
# tp4 (4-GPU machine: W2 pair at TP=4, Llama-3-70B shape), dp2 (2-GPU machine: SEPLLM serving at
# data parallel 1 then 2), w2prof (SEPLLM c356 alone on W2 under vLLM's profiler, --fast-start
# then default compilation: kernel ms per step of the real run), w2kernel (SEPLLM c356 alone on
# W2 with the default decode kernels, then FA3 throughout), oracle (the end-to-end GPU oracle
# tests of test_forced_logprobs.py by name: ORACLE_TESTS, ORACLE_S).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git_commit=$(cat .commit 2>/dev/null || echo unknown)
source .gpu/boot.sh
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
t0=$(date +%s)
# Set-up logs stay on the machine unless something failed ($OUT returns only a few files).
(MAX_JOBS=16 python3 setup.py -q build_ext --inplace) > /tmp/build.log 2>&1 \
  || { tail -20 /tmp/build.log; cp /tmp/build.log "$OUT/"; }
export VLLM_SEPLLM_SKIP_CUDA_BUILD=1 SEPLLM_COMMIT=$git_commit
source benchmarks/gpu_setup.sh > /tmp/setup.log 2>&1 || cp /tmp/setup.log "$OUT/"
cp vllm_sepllm/_C*.so /tmp/site/vllm_sepllm/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
echo "setup done in $(( $(date +%s) - t0 )) s"
# MAX_SETUP_S: give the call up at once on a host whose set-up took longer (a slow host, on
# which a W2 pair does not fit one call), so that a retry on a fresh machine costs little.
if [ -n "${MAX_SETUP_S:-}" ] && [ $(( $(date +%s) - t0 )) -gt "$MAX_SETUP_S" ]; then
  echo "set-up over MAX_SETUP_S=$MAX_SETUP_S s: slow host, nothing run"; exit 3
fi
export NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0

pair() {  # pair WORKLOAD SECONDS [RUNS...]: both runs one after the other on GPU 0
  local w=$1 limit=$2; shift 2
  CUDA_VISIBLE_DEVICES=0 timeout "$limit" python3 benchmarks/throughput.py --workload "$w" --runs "$@" --no-progress \
    --out "$OUT/h200_${w,,}.json" > "$OUT/${w,,}.log" 2>&1; echo "$w rc=$?"
  grep -v "Capturing CUDA graphs\|it/s\]" "$OUT/${w,,}.log" | tail -300 > "$OUT/${w,,}.log.tmp"; mv "$OUT/${w,,}.log.tmp" "$OUT/${w,,}.log"
  tail -25 "$OUT/${w,,}.log"
}
pair_x2() {  # pair_x2 WORKLOAD SECONDS RUN_GPU0 RUNS_GPU1...: the two GPUs at once
  local w=$1 limit=$2 first=$3; shift 3
  CUDA_VISIBLE_DEVICES=0 timeout "$limit" python3 benchmarks/throughput.py --workload "$w" \
    --runs "$first" --no-progress --out "$OUT/h200_${w,,}_gpu0.json" > "$OUT/${w,,}_gpu0.log" 2>&1 &
  local p0=$!
  CUDA_VISIBLE_DEVICES=1 timeout "$limit" python3 benchmarks/throughput.py --workload "$w" \
    --runs "$@" --no-progress --out "$OUT/h200_${w,,}_gpu1.json" > "$OUT/${w,,}_gpu1.log" 2>&1
  echo "$w gpu1 rc=$?"; wait $p0; echo "$w gpu0 rc=$?"
  for f in "$OUT/${w,,}_gpu0.log" "$OUT/${w,,}_gpu1.log"; do  # keep logs small: no progress bars
    grep -v "Capturing CUDA graphs\|it/s\]" "$f" | tail -300 > "$f.tmp"; mv "$f.tmp" "$f"
  done
  tail -12 "$OUT/${w,,}_gpu0.log"; tail -16 "$OUT/${w,,}_gpu1.log"
}
family() {  # family SHAPE TAG LOG [ARGS...]: the WF pair of one model shape on GPU 0, then one line
  local shape=$1 tag=$2 json="$OUT/h200_family_$2.json" log="$OUT/$3.log"; shift 3
  CUDA_VISIBLE_DEVICES=0 timeout ${FAM_S:-170} python3 benchmarks/throughput.py --workload WF \
    --model-shape "$shape" --fast-start --kv-cache-memory-bytes ${FAM_KV_BYTES:-6442450944} \
    --max-num-seqs 256 --runs FLASH_ATTN SEPLLM:a4s64w256c356 "$@" --no-progress --out "$json" > "$log" 2>&1
  local rc=$?
  grep -v "Capturing CUDA graphs\|it/s\]" "$log" | tail -300 > "$log.tmp"; mv "$log.tmp" "$log"
  python3 - "$json" "$log" "$tag" $rc <<'PY'
import json, os, sys
path, log, tag, rc = sys.argv[1:]
if os.path.exists(path):
    recs = json.load(open(path))
else:  # killed by the timeout: the JSON is written at the end, each record is logged as it comes
    recs = [json.loads(ln) for ln in open(log) if ln.startswith('{"workload"')]
tps = {r["config"]: r["out_tok_per_s"] for r in recs if "error" not in r}
runs = ", ".join(f"{r['run']} ERROR {r['error']}" if "error" in r
                 else f"{r['backend']} {r['config']} {r['out_tok_per_s']:.0f}" for r in recs)
ratio = f"{tps['a4s64w256c356'] / tps['-']:.2f}x" if {"-", "a4s64w256c356"} <= set(tps) else "-"
print(f"family {tag}: rc={rc}{'' if os.path.exists(path) else ' (no JSON)'}, out tok/s "
      f"{runs or 'none'}; SEPLLM / FLASH_ATTN {ratio}")
PY
}

trim_logs() {  # trim_logs FILE...: no progress bars, the last 150 lines
  for f in "$@"; do
    [ -f "$f" ] && { grep -v "Capturing CUDA graphs\|it/s\]\|s/it\]" "$f" | tail -150 > "$f.tmp"; mv "$f.tmp" "$f"; }
  done
}

timeline_run() {  # timeline_run GPU BACKEND SEPLLM_JSON TAG TREE: profile_step.py --timeline 20,
  # 512 x (1,024 + 512), into $OUT/h200_timeline_TAG.txt; TREE another checkout (gets this build's
  # extension, .gpu and .bench-data)
  local gpu=$1 backend=$2 sepllm=$3 tag=$4 tree=$5
  if [ "$tree" != . ]; then
    cp vllm_sepllm/_C*.so "$tree/vllm_sepllm/"; ln -sfn "$PWD/.gpu" "$tree/.gpu"; ln -sfn "$PWD/.bench-data" "$tree/.bench-data"
  fi
  (cd "$tree" && CUDA_VISIBLE_DEVICES=$gpu timeout ${TL_S:-300} python3 benchmarks/profile_step.py \
    --backend "$backend" --timeline 20 ${sepllm:+--sepllm "$sepllm"} --num-requests 512 \
    --prompt-len 1024 --output-len 512 --out "$OUT/h200_timeline_$tag.txt" > "/tmp/timeline_$tag.log" 2>&1
   echo "timeline $tag rc=$?")
}

for step in "$@"; do
  echo "=== $step at $(( $(date +%s) - t0 )) s"
  case $step in
    ktests) timeout ${KTESTS_S:-200} python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -m gpu \
              -k "${KTESTS_K:-padded or cuda_graph or kv_write or (test_prefill and not interp)}" \
              > "$OUT/kernel_tests.log" 2>&1; echo "ktests rc=$?"; tail -5 "$OUT/kernel_tests.log" ;;
    pytest) timeout ${PYTEST_S:-200} python3 -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:--m gpu tests} \
              > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"; tail -5 "$OUT/pytest.log" ;;
    pytest_gpu1)  # GPU tests on GPU 1 in the background of the next steps (wait_bg waits)
      (CUDA_VISIBLE_DEVICES=1 timeout ${PYTEST_S:-200} python3 -m pytest -q -p no:cacheprovider \
         ${PYTEST1_ARGS:--m gpu tests} > "$OUT/pytest_gpu1.log" 2>&1
       echo "pytest_gpu1 rc=$?" >> "$OUT/pytest_gpu1.log") &
      bg=$! ;;
    kbench) timeout ${KBENCH_S:-150} python3 benchmarks/kernels.py --only ${KBENCH_ONLY:-prefill decode} \
              --out "$OUT/h200_kernels.json" > "$OUT/kernels.log" 2>&1; echo "kbench rc=$?"; tail -30 "$OUT/kernels.log" ;;
    w0) pair W0 ${W_S:-400} FLASH_ATTN SEPLLM:a4s64w256 ;;
    startup)  # where an engine's start-up goes (vLLM's INFO timings): STARTUP_RUNS, SEPLLM c356 then
      # FLASH_ATTN, --fast-start, W0 at 16 requests; $OUT/startup.log, h200_startup.json
      VLLM_LOGGING_LEVEL=INFO CUDA_VISIBLE_DEVICES=0 timeout ${STARTUP_S:-200} python3 benchmarks/throughput.py \
        --workload W0 --num-requests 16 --runs ${STARTUP_RUNS:-SEPLLM:a4s64w256c356 FLASH_ATTN} --fast-start --no-progress \
        --out "$OUT/h200_startup.json" > "$OUT/startup.log" 2>&1; echo "startup rc=$?"
      grep -v "it/s\]" "$OUT/startup.log" | tail -400 > "$OUT/startup.log.tmp"; mv "$OUT/startup.log.tmp" "$OUT/startup.log"
      grep -iE "took|second|secs|captur|startup_s|\[[12]/2\]" "$OUT/startup.log" | cut -c1-260 | tail -50 ;;
    w1|w2)  # one GPU, one call: W_RUNS one after the other (SEPLLM c356 first, then FLASH_ATTN),
      # W_ARGS (default --fast-start). A W2 pair fits one call only where engines start in
      # ~15 s: on hosts that took 43-52 s, FLASH_ATTN was cut by the call's limit
      pair ${step^^} ${W_S:-545} ${W_RUNS:-SEPLLM:a4s64w256c356 FLASH_ATTN} ${W_ARGS---fast-start} ;;
    w2prof)  # W2 runs (PROF_RUNS, default SEPLLM c356) with vLLM's profiler in the engine core:
      # kernel ms per step of the real run and the GPU's idle time per step with the host work
      # it overlaps (profile.timeline, trace_gaps.py), PROF_STEPS steps after PROF_DELAY; per
      # mode of PROF_MODES (fast-start, default = torch.compile); the traces go to $OUT/traces
      for mode in ${PROF_MODES:-fast-start}; do
        flag=; [ $mode = fast-start ] && flag=--fast-start
        CUDA_VISIBLE_DEVICES=0 timeout ${W_S:-260} python3 benchmarks/throughput.py --workload W2 \
          --runs ${PROF_RUNS:-SEPLLM:a4s64w256c356} $flag --profile-steps ${PROF_STEPS:-40} \
          --profile-delay ${PROF_DELAY:-1000} --profile-trace "$OUT/traces" --no-progress \
          --out "$OUT/h200_w2_prof_$mode.json" > "$OUT/w2prof_$mode.log" 2>&1; echo "w2prof $mode rc=$?"
        grep -v "Capturing CUDA graphs\|it/s\]" "$OUT/w2prof_$mode.log" | tail -200 > "$OUT/w2prof.tmp"
        mv "$OUT/w2prof.tmp" "$OUT/w2prof_$mode.log"
        python3 -c "import json,sys; [print(r.get('backend'), r.get('config'), r.get('elapsed_s'), r.get('error'), json.dumps(r.get('profile', {}).get('timeline'))) for r in json.load(open(sys.argv[1]))]" "$OUT/h200_w2_prof_$mode.json"
      done ;;
    oracle)  # end-to-end GPU oracle tests (tests/test_forced_logprobs.py; not all are marked
      # gpu, so they are named): ORACLE_TESTS (default: the Triton full-batch decode case, then
      # batched and exact eviction), ORACLE_S; each test's error summary is printed
      f=tests/test_forced_logprobs.py
      timeout ${ORACLE_S:-500} python3 -m pytest -q -s -p no:cacheprovider ${ORACLE_TESTS:-$f::test_full_batch_triton_decode_matches_oracle $f::test_batched_eviction_matches_oracle $f::test_exact_eviction_matches_oracle} \
        > "$OUT/oracle.log" 2>&1; echo "oracle rc=$?"
      grep -h "forced tokens\|passed\|failed\|Error\|^tests/" "$OUT/oracle.log" | tail -40 > "$OUT/oracle_summary.txt"
      tail -12 "$OUT/oracle_summary.txt"
      trim_logs "$OUT/oracle.log" ;;
    w2kernel)  # SEPLLM c356 alone on W2, default decode kernels (Triton for batches that fill
      # the GPU), then VLLM_SEPLLM_DECODE_KERNEL=flash (FA3 throughout): the decode kernel's
      # share of the real run; W_S seconds each, W_ARGS (default --fast-start)
      for kern in default flash; do
        (if [ $kern = flash ]; then export VLLM_SEPLLM_DECODE_KERNEL=flash; fi
         CUDA_VISIBLE_DEVICES=0 timeout ${W_S:-180} python3 benchmarks/throughput.py --workload W2 \
           --runs SEPLLM:a4s64w256c356 ${W_ARGS---fast-start} --no-progress \
           --out "$OUT/h200_w2_kernel_$kern.json" > "$OUT/w2kernel_$kern.log" 2>&1
         echo "w2kernel $kern rc=$?")
        trim_logs "$OUT/w2kernel_$kern.log"
        grep -o '"elapsed_s": [0-9.]*\|"out_tok_per_s": [0-9.]*' "$OUT/h200_w2_kernel_$kern.json"
      done ;;
    tp4)  # 4-GPU machine: W2 pair (TP4_WORKLOAD) at tensor parallel 4 on the Llama-3-70B shape,
      # SEPLLM c356 first; by estimate FLASH_ATTN alone needs ~300-400 s, so W_RUNS=FLASH_ATTN in
      # a call of its own may be needed (throughput.py writes its JSON after each run)
      pair ${TP4_WORKLOAD:-W2} ${W_S:-545} ${W_RUNS:-SEPLLM:a4s64w256c356 FLASH_ATTN} \
        --model-shape llama3-70b --tensor-parallel-size 4 --fast-start ;;
    dp2)  # 2-GPU machine: SEPLLM c356 serving long generation at data parallel 1 (DP1_RATE) then
      # 2 (DP2_RATE, one engine core per GPU), serve.py; DP_SPAN s of arrivals, DP_BUDGET s each
      # (serve.py stops its server on SIGTERM; -k leaves time for that)
      for dp in 1 2; do
        rate=$([ $dp = 1 ] && echo ${DP1_RATE:-5} || echo ${DP2_RATE:-10})
        timeout -k 100 ${DP_S:-$(( ${DP_BUDGET:-230} + 40 ))} python3 benchmarks/serve.py \
          --workload long-gen --backends SEPLLM:a4s64w256c356 --rates $rate --span ${DP_SPAN:-60} \
          --budget-s ${DP_BUDGET:-230} --max-num-seqs 512 --stream-interval 8 --fast-start \
          --server-arg=--data-parallel-size=$dp --tokenizer-dir .gpu/tok --keep-logs \
          --out "$OUT/h200x2_serve_dp$dp.json" > "$OUT/serve_dp$dp.log" 2>&1; echo "dp$dp rc=$?"
        trim_logs "$OUT"/h200x2_serve_dp${dp}_*.server.log
        tail -6 "$OUT/serve_dp$dp.log"
      done ;;
    kernels_gpu1)  # kernel tests then benchmarks on GPU 1, in the background of the next steps
      (export CUDA_VISIBLE_DEVICES=1
       timeout ${KTESTS_S:-200} python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -m gpu \
         -k "${KTESTS_K:-padded or cuda_graph or kv_write or (test_prefill and not interp)}" \
         > "$OUT/kernel_tests.log" 2>&1; echo "ktests rc=$?" >> "$OUT/kernel_tests.log"
       timeout ${KBENCH_S:-150} python3 benchmarks/kernels.py --only ${KBENCH_ONLY:-prefill decode} \
         --out "$OUT/h200_kernels.json" > "$OUT/kernels.log" 2>&1; echo "kbench rc=$?" >> "$OUT/kernels.log") &
      bg=$! ;;
    wait_bg) wait ${bg:-}; for f in kernel_tests.log kernels.log stream.log pytest_gpu1.log; do
               [ -f "$OUT/$f" ] && { echo "--- $f"; tail -30 "$OUT/$f"; }; done ;;
    w0x2) pair_x2 W0 ${W_S:-400} FLASH_ATTN SEPLLM:a4s64w256 ;;
    w1x2) pair_x2 W1 ${W_S:-480} FLASH_ATTN SEPLLM:a4s64w256 ${W1_MORE:-} ;;
    w2x2) pair_x2 W2 ${W_S:-480} FLASH_ATTN SEPLLM:a4s64w256 ${W2_MORE:-} ;;
    tp2) timeout ${TP_S:-200} python3 benchmarks/tp_check.py --out "$OUT/h200x2_tp2_tokens.json" \
           > "$OUT/tp2.log" 2>&1; echo "tp2 rc=$?"
         grep -v "it/s\]" "$OUT/tp2.log" | tail -200 > "$OUT/tp2.log.tmp"; mv "$OUT/tp2.log.tmp" "$OUT/tp2.log"
         tail -30 "$OUT/tp2.log" ;;
    prof) timeout ${PROF_S:-220} python3 benchmarks/profile_step.py --out "$OUT/h200_profile.txt" ${PROF_ARGS:-} \
            > "$OUT/prof.log" 2>&1; echo "prof rc=$?"
          rm -f "$OUT/prof.log"
          head -60 "$OUT/h200_profile.txt" ;;
    w1tp2) timeout ${W_S:-560} python3 benchmarks/throughput.py --workload W1 --tensor-parallel-size 2 \
             --runs FLASH_ATTN SEPLLM:a4s64w256 --no-progress --out "$OUT/h200x2_w1_tp2.json" > "$OUT/w1tp2.log" 2>&1
           echo "w1tp2 rc=$?"
           grep -v "Capturing CUDA graphs\|it/s\]" "$OUT/w1tp2.log" | tail -300 > "$OUT/w1tp2.log.tmp"; mv "$OUT/w1tp2.log.tmp" "$OUT/w1tp2.log"
           tail -12 "$OUT/w1tp2.log" ;;
    stream_gpu1)  # SIGTERM at the limit: stream.py writes what it measured so far
      (CUDA_VISIBLE_DEVICES=1 timeout -s TERM ${STREAM_S:-540} python3 benchmarks/stream.py \
         --tokens ${STREAM_TOKENS:-4194304} --tokenizer-dir .gpu/tok --out "$OUT/h200_stream_4m.json" \
         > /tmp/stream.log 2>&1; echo "stream rc=$?" >> /tmp/stream.log
       grep -v "it/s\]" /tmp/stream.log | tail -150 > "$OUT/stream.log") &
      bg=$! ;;
    agree) CUDA_VISIBLE_DEVICES=0 timeout ${AGREE_S:-500} bash benchmarks/bench_agree.sh "$OUT" > "$OUT/agree.log" 2>&1
           echo "agree rc=$?"; tail -30 "$OUT/agree.log" ;;
    timeline_x2)  # decode-step timeline on both GPUs: TL_B0/TL_B1 backends (FLASH_ATTN, SEPLLM),
      # TL_S0/TL_S1 their sepllm JSON (default a4 s64 w256)
      b0=${TL_B0:-FLASH_ATTN} b1=${TL_B1:-SEPLLM}
      timeline_run 0 "$b0" "${TL_S0:-}" "gpu0_${b0,,}" . &
      timeline_run 1 "$b1" "${TL_S1:-}" "gpu1_${b1,,}" .
      wait; for f in "$OUT"/h200_timeline_gpu*.txt; do head -22 "$f"; done ;;
    timeline)  # decode-step timeline on GPU 0: TL_BACKEND (SEPLLM), TL_SEPLLM (its JSON, default
      # a4 s64 w256), TL_TREE (run another checkout's code from there, e.g. an older commit's tree
      # for a before/after pair on one machine), TL_TAG (file: $OUT/h200_timeline_$TL_TAG.txt)
      tag=${TL_TAG:-${TL_BACKEND:-SEPLLM}}
      timeline_run 0 ${TL_BACKEND:-SEPLLM} "${TL_SEPLLM:-}" "$tag" "${TL_TREE:-.}"
      [ -f "$OUT/h200_timeline_$tag.txt" ] && head -24 "$OUT/h200_timeline_$tag.txt" || tail -20 "/tmp/timeline_$tag.log" ;;
    host)  # scheduler-side host time per decode step at 512 requests, vLLM alone vs SEPLLM (CPU only)
      for c in "" ', "cache_size": 356'; do
        timeout ${HOST_S:-120} python3 benchmarks/host_step.py --tokenizer-dir .gpu/tok --steps 100 \
          --sepllm "{\"num_sinks\": 4, \"sep_cap\": 64, \"window\": 256$c}" 2>&1 | grep -v "INFO\|WARNING" | tail -4
      done | tee "$OUT/host_step.log" ;;
    prefix_light|prefix_heavy)  # prefix-cached serving, FLASH_ATTN vs SEPLLM (benchmarks/prefix_serve.sh)
      p=${step#prefix_}
      CUDA_VISIBLE_DEVICES=0 timeout ${PREFIX_S:-560} bash benchmarks/prefix_serve.sh "$OUT" $p 2>&1
      echo "$step rc=$?"  # 4 files in $OUT: h200_prefix_$p{_FLASH_ATTN.json,_SEPLLM.json,_meta.json,.log}
      python3 benchmarks/plot_prefix.py --dir "$OUT" --points $p --no-plot ;;
    families)  # one WF pair per model shape (FAMILIES), FAM_S seconds each
      for shape in ${FAMILIES:-llama3.1-8b qwen3-8b qwen2.5-7b mistral-7b qwen3-30b-a3b}; do
        family "$shape" "$shape" "family_$shape"
      done ;;
    fp8pair) family llama3.1-8b llama3.1-8b_fp8 family_fp8 --kv-cache-dtype fp8 ;;
    soak)  # the script writes its JSON on its deadline, on SIGTERM, and every 15 s while it runs
      CUDA_VISIBLE_DEVICES=0 timeout -k 20 -s TERM ${SOAK_S:-500} python3 benchmarks/soak.py \
        --tokenizer-dir .gpu/tok --deadline $(( ${SOAK_S:-500} - 30 )) ${SOAK_ARGS:-} \
        --out "$OUT/h200_soak.json" > "$OUT/soak.log" 2>&1; echo "soak rc=$?"
      grep -v "Capturing CUDA graphs\|it/s\]\|sepllm: request .* finished:" "$OUT/soak.log" | tail -300 \
        > "$OUT/soak.log.tmp"; mv "$OUT/soak.log.tmp" "$OUT/soak.log"
      tail -8 "$OUT/soak.log" ;;
    v2check)  # SEPLLM on vLLM's V2 model runner: greedy tokens = V1's (benchmarks/v2_check.py)
      CUDA_VISIBLE_DEVICES=0 timeout ${V2_S:-300} python3 benchmarks/v2_check.py --out "$OUT/v2check" \
        ${V2_ARGS:-} > "$OUT/v2check.log" 2>&1; echo "v2check rc=$?"; tail -30 "$OUT/v2check.log" ;;
    w2runner)  # W2, SEPLLM c356 on the V1 then the V2 runner, no replay (replay needs V1)
      CUDA_VISIBLE_DEVICES=0 timeout ${W_S:-540} python3 benchmarks/throughput.py --workload W2 --no-replay \
        --runs ${RUNNER_RUNS:-SEPLLM:a4s64w256c356@v1 SEPLLM:a4s64w256c356@v2} ${RUNNER_ARGS:-} --no-progress \
        --out "$OUT/h200_w2_runner.json" > "$OUT/w2_runner.log" 2>&1; echo "w2runner rc=$?"
      grep -v "Capturing CUDA graphs\|it/s\]" "$OUT/w2_runner.log" | tail -300 > "$OUT/w2r.tmp"; mv "$OUT/w2r.tmp" "$OUT/w2_runner.log"
      tail -12 "$OUT/w2_runner.log" ;;
    serve)  # serving goodput, benchmarks/serve.py: SERVE_WORKLOAD (long-gen, long-prompt, chat),
      # SERVE_BACKENDS, SERVE_RATES, SERVE_SPAN (s of arrivals a point), SERVE_BUDGET (s per
      # backend, server start included), SERVE_ARGS more flags, SERVE_S the step's limit;
      # writes $OUT/h200_serve_<workload>.json and serve_<workload>.log (+ server log tails)
      for wl in ${SERVE_WORKLOAD:-long-gen}; do
        CUDA_VISIBLE_DEVICES=0 timeout -k 10 ${SERVE_S:-560} python3 benchmarks/serve.py --workload $wl \
          --backends ${SERVE_BACKENDS:-FLASH_ATTN SEPLLM:a4s64w256c356} --rates ${SERVE_RATES:-2 4} \
          --span ${SERVE_SPAN:-60} --budget-s ${SERVE_BUDGET:-270} --max-num-seqs 512 --stream-interval 8 \
          --tokenizer-dir .gpu/tok --keep-logs ${SERVE_ARGS:-} --out "$OUT/h200_serve_$wl.json" \
          > "$OUT/serve_$wl.log" 2>&1; echo "serve $wl rc=$?"
        trim_logs "$OUT"/h200_serve_${wl}_*.server.log  # keep logs small
        tail -20 "$OUT/serve_$wl.log"
      done ;;
    cli) timeout ${CLI_S:-300} bash benchmarks/gpu_cli_check.sh "$OUT/cli" > "$OUT/cli.log" 2>&1; echo "cli rc=$?"; tail -20 "$OUT/cli.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "all done in $(( $(date +%s) - t0 )) s"
