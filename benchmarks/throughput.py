"""End-to-end throughput and KV footprint: vanilla vLLM vs SEPLLM, side by side in one run.

    python benchmarks/throughput.py --workload W0 --runs FLASH_ATTN SEPLLM:a4s64w256 \\
        --model-shape llama3-8b --load-format dummy --out benchmarks/results/w0.json

Each run is a fresh engine in a subprocess (same prompts, same settings, prefix caching off for
everyone). Prompts are cut from real public-domain text (see common.py), so separators occur at
natural rates. A run spec is ``BACKEND`` or ``SEPLLM:<config>`` with config ``a4s64w256``
(sinks, separator cap, window), ``a4sNonew256`` (no cap) or ``stream:a4w256`` (StreamingLLM mode).

Recorded per run: workload, backend, config, elapsed_s, out_tok_per_s, total_tok_per_s,
num_kv_blocks (pool), block_size, peak_kv_blocks (most blocks in use at once), peak_running,
blocks_per_request (blocks a finished request held, mean: its steady footprint),
blocks_per_request_peak (most blocks a request held at once, e.g. during a prefill chunk),
max_concurrency (requests whose steady footprint fits the pool, leaving one prefill chunk),
retained_ratio (mean kv retained / tokens), gpu, vllm_version, commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    LLAMA3_8B,
    WORKLOADS,
    environment,
    make_dummy_model,
    real_prompt_ids,
    separator_rate,
)


def parse_run(spec: str) -> tuple[str, dict | None, str]:
    """``"FLASH_ATTN"`` -> (FLASH_ATTN, None, "-"); ``"SEPLLM:a4s64w256"`` -> SepLLM config."""
    if ":" not in spec:
        return spec, None, "-"
    backend, cfg = spec.split(":", 1)
    mode = "sepllm"
    if cfg.startswith("stream:"):
        mode, cfg = "streamingllm", cfg[len("stream:"):]
    m = re.fullmatch(r"a(\d+)(?:s(\d+|None))?w(\d+)", cfg)
    if not m:
        raise SystemExit(f"bad run spec {spec!r}: expected e.g. SEPLLM:a4s64w256")
    a, s, w = m.groups()
    sepllm = {"mode": mode, "num_sinks": int(a), "window": int(w),
              "sep_cap": None if s in (None, "None") else int(s)}
    if mode == "streamingllm":
        sepllm["sep_cap"] = 0
    return backend, sepllm, cfg if mode == "sepllm" else f"stream:{cfg}"


def run_one(args: argparse.Namespace) -> dict:
    """One engine, one workload; returns the record. Runs in a child process."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    # The engine core runs in its own process as usual; the scheduler writes its KV peaks here.
    trace = Path(tempfile.mkdtemp(prefix="sepllm-trace-")) / "kv.json"
    os.environ["VLLM_SEPLLM_KV_TRACE"] = str(trace)

    backend, sepllm, label = parse_run(args.run)
    n, plen, olen = WORKLOADS[args.workload]
    if args.num_requests:
        n = args.num_requests
    kwargs = dict(model=args.model, load_format=args.load_format, dtype=args.dtype,
                  max_model_len=plen + olen + 16, enable_prefix_caching=False,
                  attention_backend=backend, seed=0, max_num_seqs=args.max_num_seqs)
    if sepllm is not None:
        kwargs["additional_config"] = {"sepllm": sepllm}
    else:  # same KV-peak tracing on the baseline side (async scheduling is off on CPU)
        kwargs["scheduler_cls"] = ("vllm_sepllm.instrument.TrackingScheduler"
                                   if current_platform.is_cpu()
                                   else "vllm_sepllm.instrument.TrackingAsyncScheduler")
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = real_prompt_ids(tok, n, plen, seed=args.seed)
    params = SamplingParams(max_tokens=olen, ignore_eos=True, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:64])],
                 SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=args.progress)
    elapsed = time.perf_counter() - t0

    vllm_config = llm.llm_engine.vllm_config
    block_size = vllm_config.cache_config.block_size
    kv = json.loads(trace.read_text())
    total_blocks = kv["num_kv_blocks"]
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = [(o.kv_transfer_params or {}).get("sepllm") for o in outs]
    if all(stats):
        peak_blocks = sum(s["peak_kv_blocks"] for s in stats) / len(stats)
        steady = sum(math.ceil(s["kv_retained"] / block_size) for s in stats) / len(stats)
        retained = sum(s["retained_ratio"] for s in stats) / len(stats)
        # Residents hold their retained tokens; one prefill chunk at a time is transient.
        chunk_blocks = math.ceil(vllm_config.scheduler_config.max_num_batched_tokens
                                 / block_size)
        max_concurrency = int((total_blocks - chunk_blocks) // math.ceil(steady))
    else:
        peak_blocks = steady = math.ceil((plen + olen - 1) / block_size)
        retained = 1.0
        max_concurrency = int(total_blocks // steady)
    record = {
        "workload": args.workload, "backend": backend, "config": label,
        "num_requests": n, "prompt_tokens": plen, "output_tokens": olen,
        "elapsed_s": round(elapsed, 2), "startup_s": round(startup, 1),
        "out_tok_per_s": round(out_tokens / elapsed, 1),
        "total_tok_per_s": round((out_tokens + n * plen) / elapsed, 1),
        "num_kv_blocks": total_blocks, "block_size": block_size,
        "peak_kv_blocks": kv["peak_kv_blocks"], "peak_running": kv["peak_running"],
        "blocks_per_request": round(steady, 2),
        "blocks_per_request_peak": round(peak_blocks, 2),
        "max_concurrency": max_concurrency,
        "retained_ratio": round(retained, 4),
        "prompt_separator_rate": round(separator_rate(
            prompts, set(vllm_config.additional_config.get("sepllm", {})
                         .get("separator_token_ids", []))), 4) if sepllm else None,
        "max_num_seqs": args.max_num_seqs, "dtype": args.dtype,
    }
    record.update(environment())
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="W0", choices=sorted(WORKLOADS))
    p.add_argument("--runs", nargs="+", default=["FLASH_ATTN", "SEPLLM:a4s64w256"])
    p.add_argument("--run", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--model", default=None, help="HF folder; default: a dummy-weight shape")
    p.add_argument("--model-shape", default="llama3-8b", choices=["llama3-8b"])
    p.add_argument("--tokenizer-dir", default=".gpu/tok")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.0)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    if args.run:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    tmp = None
    if args.model is None:
        tmp = tempfile.mkdtemp(prefix="sepllm-model-")
        args.model = str(make_dummy_model(Path(tmp) / args.model_shape,
                                          Path(args.tokenizer_dir), LLAMA3_8B))
    records = []
    for spec in args.runs:
        cmd = [sys.executable, __file__, "--run", spec]
        for k, v in vars(args).items():
            if k in ("run", "runs", "out") or v in (None, False, 0, 0.0):
                continue
            cmd += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}",
                                                                   str(v)]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            records.append({"workload": args.workload, "run": spec, "error": proc.returncode})
            continue
        records.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(records[-1]), flush=True)
    base = next((r for r in records if r.get("config") == "-" and "error" not in r), None)
    print(f"\n{'run':28} {'out tok/s':>10} {'total tok/s':>12} {'blocks/req':>10} "
          f"{'max conc':>9} {'retained':>9} {'speed-up':>9}")
    for r in records:
        if "error" in r:
            print(f"{r['run']:28} ERROR {r['error']}")
            continue
        speed = r["out_tok_per_s"] / base["out_tok_per_s"] if base else float("nan")
        name = f"{r['backend']} {r['config']}"
        print(f"{name:28} {r['out_tok_per_s']:>10.0f} {r['total_tok_per_s']:>12.0f} "
              f"{r['blocks_per_request']:>10.1f} {r['max_concurrency']:>9} "
              f"{r['retained_ratio']:>9.3f} {speed:>8.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
