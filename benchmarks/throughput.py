"""End-to-end throughput and KV footprint: vanilla vLLM vs SEPLLM, side by side in one run.

    python benchmarks/throughput.py --workload W0 --runs FLASH_ATTN SEPLLM:a4s64w256 \\
        --model-shape llama3-8b --load-format dummy --out benchmarks/results/w0.json

Each run is a fresh engine in a subprocess (same prompts, same settings, prefix caching off for
everyone). Prompts are cut from real public-domain text (see common.py), so separators occur at
natural rates. A run spec is ``BACKEND`` or ``SEPLLM:<config>`` with config ``a4s64w256``
(sinks, separator cap, window), ``a4sNonew256`` (no cap) or ``stream:a4w256`` (StreamingLLM mode),
each optionally followed by ``cN``: ``sepllm.cache_size`` (batched eviction), e.g. ``a4s64w256c356``.

Decoding replays text (on by default; ``--no-replay`` turns it off): each request emits the real
text that follows its prompt, forced by the logits processor of replay.py, so generated tokens
hold separators at the natural rate too (dummy weights would otherwise emit arbitrary tokens,
almost never separators, and SepLLM would behave like StreamingLLM). With a custom logits
processor vLLM 0.26 runs its V1 model runner for every backend.

``--model-shape`` picks the dummy model among ``common.SHAPES`` (Llama 3/3.1 8B, Qwen3 8B,
Qwen2.5 7B, Mistral 7B, Qwen3-30B-A3B MoE), ``--kv-cache-dtype`` the KV cache's storage
(``fp8``: one byte per element), ``--fast-start`` skips torch.compile and captures full CUDA
graphs of decode-only steps only, so an engine starts in ~30 s instead of ~70 s (for several
families in one device call; ``compilation`` in the record says which; without torch.compile
the decode graph's non-attention kernels are not fused, so its GPU step may be longer: not
measured yet).
``--profile-steps N`` (after ``--profile-delay K`` engine steps) runs vLLM's torch profiler in
the engine core of the real run and records ``profile``: kernel ms per step and the top kernels.

``--prompts vllm-random`` takes the prompts from ``vllm bench throughput``'s own random dataset
(same function, same seed: identical token ids) and samples like it (temperature 1, no replay),
so the figures can be set beside that command's (see README.md).

Recorded per run: workload, model (shape name, or the ``--model`` folder's name), backend,
config, replay, prompts, kv_cache_dtype (as asked), kv_bytes_per_token (KV bytes one token
takes in all layers at that dtype), num_kv_heads, num_layers, head_dim, vocab_size, compilation
(``fast-start`` or ``default``), elapsed_s, out_tok_per_s,
total_tok_per_s, num_kv_blocks (pool), block_size, peak_kv_blocks (most blocks in use at once),
peak_running, blocks_per_request (blocks a finished request held, mean: its steady footprint),
blocks_per_request_peak (most blocks a request held at once, e.g. during a prefill chunk),
max_concurrency (requests whose steady footprint fits the pool, leaving one prefill chunk),
retained_ratio (mean kv retained / tokens), prompt/output separator rates, replay_exact
(fraction of requests whose output is exactly their continuation), the roofline estimate
(``roofline``: see :func:`roofline`), gpu, vllm_version, commit. The report ends with a table
and, where matplotlib imports, a PNG next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    NO_PLOT,
    SHAPES,
    WORKLOADS,
    environment,
    kv_bytes_per_token,
    make_dummy_model,
    pyplot,
    real_prompts_and_continuations,
    separator_rate,
)
from benchmarks.trace_gaps import (find_trace, load_events, step_log_summary,  # noqa: E402
                                   summarize)

#: H200 figures used by the roofline (ENVIRONMENT.md: device-to-device copy, measured bf16 GEMM).
H200_HBM_TBPS = 4.3
H200_BF16_TFLOPS = 790.0


def split_runner(spec: str) -> tuple[str, str | None]:
    """``"SEPLLM:a4s64w256@v2"`` -> (``"SEPLLM:a4s64w256"``, ``"1"``): a run spec may end in
    ``@v1`` or ``@v2``, vLLM's GPU model runner for that run (``VLLM_USE_V2_MODEL_RUNNER``);
    without it vLLM (and the plugin) choose."""
    base, sep, runner = spec.rpartition("@")
    if not sep:
        return spec, None
    if runner not in ("v1", "v2"):
        raise SystemExit(f"bad run spec {spec!r}: the runner suffix is @v1 or @v2")
    return base, "1" if runner == "v2" else "0"


def parse_run(spec: str) -> tuple[str, dict | None, str]:
    """``"FLASH_ATTN"`` -> (FLASH_ATTN, None, "-"); ``"SEPLLM:a4s64w256"`` -> SepLLM config."""
    spec = split_runner(spec)[0]
    if ":" not in spec:
        return spec, None, "-"
    backend, cfg = spec.split(":", 1)
    mode = "sepllm"
    if cfg.startswith("stream:"):
        mode, cfg = "streamingllm", cfg[len("stream:"):]
    m = re.fullmatch(r"a(\d+)(?:s(\d+|None))?w(\d+)(?:c(\d+))?", cfg)
    if not m:
        raise SystemExit(f"bad run spec {spec!r}: expected e.g. SEPLLM:a4s64w256 or a4s64w256c356")
    a, s, w, c = m.groups()
    sepllm = {"mode": mode, "num_sinks": int(a), "window": int(w),
              "sep_cap": None if s in (None, "None") else int(s)}
    if c is not None:
        sepllm["cache_size"] = int(c)
    if mode == "streamingllm":
        sepllm["sep_cap"] = 0
    return backend, sepllm, cfg if mode == "sepllm" else f"stream:{cfg}"


# ---------------------------------------------------------------------------- roofline
def kv_element_bytes(kv_cache_dtype: str, dtype: str, cfg: dict) -> int:
    """Bytes of one KV-cache element: 1 for the fp8 formats; else that of the cache dtype, which
    ``auto`` takes from the model (``--dtype``, or config.json's ``torch_dtype`` where that is
    ``auto`` too): 4 for float32, 2 for bf16/fp16."""
    if kv_cache_dtype.startswith("fp8"):
        return 1
    name = dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    if name == "auto":
        name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return 4 if name in ("float32", "float", "fp32") else 2


def model_bytes_and_flops(cfg: dict, batch: int = 1, kv_bytes: int = 2) -> dict:
    """From an HF ``config.json`` (Llama, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE): bytes of weights
    one decode step of ``batch`` requests reads (bf16; the embedding table is gathered, not
    read, unless tied to the LM head), matmul parameters a token passes through (the LM head
    only runs for the last prompt token), KV bytes per token (``kv_bytes`` per element: 2 for
    bf16, 1 for fp8). ``head_dim`` defaults to hidden / heads where the config has none
    (Qwen2.5); biases and q/k norms are left out (well under 0.1% of the weights).

    MoE layers (Qwen3-MoE: ``num_experts``, which transformers 5 saves as ``num_local_experts``,
    ``num_experts_per_tok`` = top-k, ``moe_intermediate_size``; ``mlp_only_layers`` /
    ``decoder_sparse_step`` keep a dense MLP), kept simple: a token's FLOPs pass through the
    router and its top-k experts; a decode step reads attention, router and
    ``min(num_experts, batch * top_k)`` experts per layer, i.e. as if every token picked experts
    no other token picked. That over-counts where routing overlaps (worst near
    ``batch * top_k = num_experts``), so the MoE decode bound is loose there; from a few times
    that batch on, every expert is read anyway."""
    h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    vocab = cfg["vocab_size"]
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h + 2 * h  # q, k, v, o + two norms
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    top_k = cfg.get("num_experts_per_tok") or 0
    step, dense_only = cfg.get("decoder_sparse_step") or 1, cfg.get("mlp_only_layers") or []
    n_sparse = sum(1 for i in range(n_layers)  # the layers with experts, as Qwen3-MoE picks
                   if n_exp and i not in dense_only and (i + 1) % step == 0)
    dense = (n_layers - n_sparse) * 3 * h * cfg.get("intermediate_size", 0)
    expert = 3 * h * (cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 0))
    experts_read = min(n_exp, batch * top_k)
    base = n_layers * attn + dense + n_sparse * h * n_exp + h  # + router, + final norm
    layers = base + n_sparse * top_k * expert
    lm_head = vocab * h
    out = {"layers": n_layers, "q_heads": hq, "head_dim": d,
           "layer_params": layers, "lm_head_params": lm_head,
           "decode_weight_bytes": 2 * (base + n_sparse * experts_read * expert + lm_head),
           "kv_bytes_per_token": kv_bytes_per_token(cfg, kv_bytes)}
    if n_sparse:
        out["experts_read_per_layer"] = experts_read
    return out


def _causal_keys(n: int, cap: float) -> float:
    """sum_{t=1..n} min(t, cap): keys seen by the n queries of a prompt whose visible set is
    capped at ``cap`` keys (cap = inf: causal)."""
    if cap >= n:
        return n * (n + 1) / 2
    c = math.floor(cap)
    return c * (c + 1) / 2 + (n - c) * cap


def roofline(shape: dict, n: int, plen: int, olen: int, retained_ratio: float,
             kv_retained: float | None, batch: int, hbm_tbps: float, tflops: float) -> dict:
    """Lower bound on the workload's time, from two terms:

    * prefill (compute-bound): ``2 * layer_params * n * plen + 2 * lm_head_params * n`` matmul
      FLOPs plus attention ``4 * layers * q_heads * head_dim * sum_t min(t, K)`` (``K`` = keys a
      query sees: all earlier ones for full attention, the request's retained KV for SepLLM),
      over the peak bf16 rate;
    * decode: each step reads the weights once (a MoE only the experts its batch touches,
      see :func:`model_bytes_and_flops`) and every running request's retained KV,
      ``decode_weight_bytes + batch * kv_tokens * kv_bytes_per_token`` over HBM bandwidth,
      with ``kv_tokens = retained_ratio * (plen + olen / 2)`` (the mean context times the
      measured retained fraction); at large batches the step's FLOPs (``batch * (2 *
      (layer_params + lm_head_params) + 4 * layers * q_heads * head_dim * kv_tokens)``) over
      the peak rate can be longer, so a step takes the larger of the two. ``n * olen / batch``
      steps, ``batch`` = the most requests that can run at once (``min(n, max_num_seqs,
      max_concurrency)``).

    Returns the two times, the roofline output tok/s and the inputs used."""
    cap = kv_retained if kv_retained is not None and retained_ratio < 1.0 else float("inf")
    attn = 4 * shape["layers"] * shape["q_heads"] * shape["head_dim"] * _causal_keys(plen, cap)
    prefill_flops = n * (2 * shape["layer_params"] * plen + 2 * shape["lm_head_params"] + attn)
    t_prefill = prefill_flops / (tflops * 1e12)
    kv_tokens = retained_ratio * (plen + olen / 2)
    step_bytes = shape["decode_weight_bytes"] + batch * kv_tokens * shape["kv_bytes_per_token"]
    step_flops = batch * (2 * (shape["layer_params"] + shape["lm_head_params"])
                          + 4 * shape["layers"] * shape["q_heads"] * shape["head_dim"]
                          * kv_tokens)
    t_step = max(step_bytes / (hbm_tbps * 1e12), step_flops / (tflops * 1e12))
    steps = n * olen / batch
    t_decode = steps * t_step
    total = t_prefill + t_decode
    out = {"hbm_tbps": hbm_tbps, "bf16_tflops": tflops, "batch": batch,
           "decode_weight_bytes": shape["decode_weight_bytes"],
           "kv_bytes_per_token": shape["kv_bytes_per_token"],
           "kv_tokens_per_step_per_request": round(kv_tokens, 1),
           "prefill_tflop": round(prefill_flops / 1e12, 1),
           "decode_bound": ("memory" if step_bytes / (hbm_tbps * 1e12)
                            >= step_flops / (tflops * 1e12) else "compute"),
           "t_prefill_s": round(t_prefill, 3), "t_decode_s": round(t_decode, 3),
           "t_total_s": round(total, 3),
           "out_tok_per_s": round(n * olen / total, 1)}
    if "experts_read_per_layer" in shape:
        out["experts_read_per_layer"] = shape["experts_read_per_layer"]
    return out


# ---------------------------------------------------------------------------- one run
def _vllm_random_requests(args: argparse.Namespace, n: int, plen: int, olen: int) -> list:
    """The requests ``vllm bench throughput --dataset-name random --random-input-len plen
    --random-output-len olen --random-range-ratio 0 --num-prompts n --seed S`` would send
    (vLLM's own function, so the same prompts)."""
    from vllm.benchmarks import throughput as vbench
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vbench.add_cli_args(parser)
    bargs = parser.parse_args([
        "--model", args.model, "--dataset-name", "random", "--random-range-ratio", "0",
        "--random-input-len", str(plen), "--random-output-len", str(olen),
        "--num-prompts", str(n), "--seed", str(args.seed)])
    vbench.validate_args(bargs)
    tok = get_tokenizer(bargs.tokenizer, tokenizer_mode=bargs.tokenizer_mode,
                        trust_remote_code=bargs.trust_remote_code)
    return vbench.get_requests(bargs, tok)


def profile_summary(prof_dir: Path, steps: int, delay: int) -> dict:
    """Kernel time per engine step from the table vLLM's profiler writes (rank 0), with the
    top kernels; on a CPU-only engine the CPU op time instead."""
    path = prof_dir / "profiler_out_0.txt"
    if not path.exists():
        return {"steps": steps, "delay": delay, "error": f"no {path.name} written"}
    text = path.read_text()
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def total(label: str) -> float | None:
        m = re.search(rf"{label} time total: ([0-9.]+)(us|ms|s)\b", text)
        return float(m.group(1)) * units[m.group(2)] if m else None

    gpu, cpu = total("Self CUDA"), total("Self CPU")
    # torch's table: a dashed rule, the header, a rule, the rows, a rule, the totals.
    lines = text.splitlines()
    rules = [i for i, ln in enumerate(lines) if ln.startswith("---")]
    rows = lines[rules[1] + 1:rules[2]] if len(rules) >= 3 else []
    return {"steps": steps, "delay": delay,
            "gpu_kernel_ms_per_step": None if gpu is None else round(gpu / steps, 3),
            "cpu_op_ms_per_step": None if cpu is None else round(cpu / steps, 3),
            "top": [" ".join(ln.split())[:200] for ln in rows[:8]]}


def run_one(args: argparse.Namespace) -> dict:
    """One engine, one workload; returns the record. Runs in a child process."""
    import numpy as np
    from transformers import AutoTokenizer

    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    backend, sepllm, label = parse_run(args.run)
    n, plen, olen = WORKLOADS[args.workload]
    if args.num_requests:
        n = args.num_requests
    replay = args.prompts == "real-text" and not args.no_replay

    # Prompts (and continuations) before the engine starts: the engine core reads the file.
    tok = AutoTokenizer.from_pretrained(args.model)
    sep_ids = set(separator_token_ids(tok, SepLLMConfig()))
    work = Path(tempfile.mkdtemp(prefix="sepllm-bench-"))
    if args.prompts == "vllm-random":
        bench_requests = _vllm_random_requests(args, n, plen, olen)
        prompts = [r.prompt for r in bench_requests]
        prompt_ids = [p["prompt_token_ids"] if isinstance(p, dict) else
                      tok.encode(p, add_special_tokens=False) for p in prompts]
        out_lens = [r.expected_output_len for r in bench_requests]
        conts = None
    else:
        prompt_ids, conts = real_prompts_and_continuations(tok, n, plen, olen, seed=args.seed)
        prompts, out_lens = prompt_ids, [olen] * n
    cont_file = work / "continuations.npy"
    if replay:
        np.save(cont_file, np.asarray(conts, dtype=np.int32))

    # The engine core runs in its own process as usual; the scheduler writes its KV peaks here.
    trace = work / "kv.json"
    os.environ["VLLM_SEPLLM_KV_TRACE"] = str(trace)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

    from vllm import LLM, SamplingParams
    from vllm.inputs import TextPrompt, TokensPrompt
    from vllm.platforms import current_platform

    kwargs = dict(model=args.model, load_format=args.load_format, dtype=args.dtype,
                  max_model_len=plen + olen + 16, enable_prefix_caching=False,
                  attention_backend=backend, seed=args.seed, max_num_seqs=args.max_num_seqs)
    if sepllm is not None:
        kwargs["additional_config"] = {"sepllm": sepllm}
    else:  # same KV-peak tracing on the baseline side (async scheduling is off on CPU)
        kwargs["scheduler_cls"] = ("vllm_sepllm.instrument.TrackingScheduler"
                                   if current_platform.is_cpu()
                                   else "vllm_sepllm.instrument.TrackingAsyncScheduler")
    if replay:
        from benchmarks.replay import FQCN

        kwargs["logits_processors"] = [FQCN]
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if args.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    if args.fast_start:  # no torch.compile (~40 s a start); full CUDA graphs for decode steps
        kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    prof_dir = None
    if args.profile_steps:
        # vLLM's own profiler in the engine core (the real multiprocess run): torch.profiler
        # over profile_steps engine steps after profile_delay, summed kernel time per step.
        prof_dir = work / "profile"
        kwargs["profiler_config"] = {
            "profiler": "torch", "torch_profiler_dir": str(prof_dir),
            "delay_iterations": args.profile_delay, "max_iterations": args.profile_steps,
            "torch_profiler_with_stack": False, "ignore_frontend": True}
        # vLLM's runner and scheduler scopes (and SepLLM's) in the trace (trace_gaps.py).
        os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0

    if args.prompts == "vllm-random":  # as vllm bench throughput samples
        params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True,
                                 max_tokens=k) for k in out_lens]
        inputs = [TokensPrompt(prompt_token_ids=p["prompt_token_ids"]) if isinstance(p, dict)
                  else TextPrompt(prompt=p) for p in prompts]
    else:
        params = [SamplingParams(max_tokens=olen, ignore_eos=True, temperature=0.0,
                                 extra_args={"replay": {"file": str(cont_file), "row": i}}
                                 if replay else None) for i in range(n)]
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0][:64])],
                 SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    if prof_dir is not None:
        llm.start_profile()
    t0, wall0 = time.perf_counter(), time.time()
    outs = llm.generate(inputs, params, use_tqdm=not args.no_progress)
    elapsed, wall1 = time.perf_counter() - t0, time.time()
    if prof_dir is not None:
        llm.stop_profile()

    vllm_config = llm.llm_engine.vllm_config
    block_size = vllm_config.cache_config.block_size
    kv = json.loads(trace.read_text())
    total_blocks = kv["num_kv_blocks"]
    out_ids = [list(o.outputs[0].token_ids) for o in outs]
    out_tokens = sum(len(o) for o in out_ids)
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    stats = [(o.kv_transfer_params or {}).get("sepllm") for o in outs]
    kv_retained = None
    if all(stats):
        peak_blocks = sum(s["peak_kv_blocks"] for s in stats) / len(stats)
        kv_retained = sum(s["kv_retained"] for s in stats) / len(stats)
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
    model_cfg = json.loads((Path(args.model) / "config.json").read_text())
    kv_bytes = kv_element_bytes(args.kv_cache_dtype, args.dtype, model_cfg)
    record = {
        "workload": args.workload, "model": Path(args.model).name,
        "backend": backend, "config": label,
        # the GPU model runner that ran (vLLM's choice, the plugin's, or a run's @v1/@v2)
        "model_runner": "V2" if llm.llm_engine.vllm_config.use_v2_model_runner else "V1",
        "replay": replay, "prompts": args.prompts,
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_bytes_per_token": kv_bytes_per_token(model_cfg, kv_bytes),
        "num_kv_heads": model_cfg.get("num_key_value_heads",
                                      model_cfg["num_attention_heads"]),
        "num_layers": model_cfg["num_hidden_layers"],
        "head_dim": (model_cfg.get("head_dim")
                     or model_cfg["hidden_size"] // model_cfg["num_attention_heads"]),
        "vocab_size": model_cfg["vocab_size"],
        "compilation": "fast-start" if args.fast_start else "default",
        "num_requests": n, "prompt_tokens": plen, "output_tokens": olen,
        "elapsed_s": round(elapsed, 2), "startup_s": round(startup, 1),
        "out_tok_per_s": round(out_tokens / elapsed, 1),
        "total_tok_per_s": round((out_tokens + in_tokens) / elapsed, 1),
        "num_kv_blocks": total_blocks, "block_size": block_size,
        "peak_kv_blocks": kv["peak_kv_blocks"], "peak_running": kv["peak_running"],
        "blocks_per_request": round(steady, 2),
        "blocks_per_request_peak": round(peak_blocks, 2),
        "max_concurrency": max_concurrency,
        "retained_ratio": round(retained, 4),
        "kv_retained_per_request": None if kv_retained is None else round(kv_retained, 1),
        "prompt_separator_rate": round(separator_rate(prompt_ids, sep_ids), 4),
        "output_separator_rate": round(separator_rate(out_ids, sep_ids), 4),
        "replay_exact": (round(sum(o == c for o, c in zip(out_ids, conts)) / n, 4)
                         if replay else None),
        "max_num_seqs": args.max_num_seqs, "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
    }
    if "steps" in kv:  # where the timed run's wall time went (trace_gaps.step_log_summary)
        record["step_log"] = step_log_summary(kv["steps"], kv.get("gc"), wall0, wall1)
    if prof_dir is not None:
        record["profile"] = profile_summary(prof_dir, args.profile_steps, args.profile_delay)
        trace_file = find_trace(prof_dir)
        if trace_file is not None:
            try:
                record["profile"]["timeline"] = summarize(load_events(trace_file))
            except (OSError, EOFError, ValueError, KeyError) as e:  # (a cut .gz: EOFError)
                record["profile"]["timeline"] = {"error": f"{type(e).__name__}: {e}"}
            if args.profile_trace:
                dest = Path(args.profile_trace)
                dest.mkdir(parents=True, exist_ok=True)
                run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.run)
                shutil.copy(trace_file, dest / f"{run_name}_{trace_file.name}")
    record.update(environment())
    hbm, tflops = args.hbm_tbps, args.peak_tflops
    if hbm is None and record["gpu"] != "cpu":
        hbm, tflops = H200_HBM_TBPS, tflops or H200_BF16_TFLOPS
    if hbm and tflops:
        # TP=k: k GPUs, each reads 1/k of the weights and KV and does 1/k of the FLOPs.
        hbm, tflops = hbm * args.tensor_parallel_size, tflops * args.tensor_parallel_size
        batch = max(1, min(n, args.max_num_seqs, max_concurrency))
        shape = model_bytes_and_flops(model_cfg, batch, kv_bytes)
        roof = roofline(shape, n, plen, olen, retained, kv_retained, batch, hbm, tflops)
        roof["pct_reached"] = round(100 * record["out_tok_per_s"] / roof["out_tok_per_s"], 1)
        record["roofline"] = roof
    return record


# ---------------------------------------------------------------------------- report
def report_table(records: list[dict]) -> str:
    """The readable table printed at the end of a run (speed-up vs the run without config)."""
    base = next((r for r in records if r.get("config") == "-" and "error" not in r), None)
    models = [r.get("model", "-")  # records before the model families had no model field
              + (f" kv {r['kv_cache_dtype']}" if r.get("kv_cache_dtype", "auto") != "auto"
                 else "") for r in records]
    mw = max([5] + [len(m) for m in models])
    lines = [f"{'model':{mw}} {'run':28} {'out tok/s':>10} {'total tok/s':>12} {'speed-up':>9} "
             f"{'peak blocks':>11} {'blocks/req':>10} {'max conc':>9} {'retained':>9} "
             f"{'out seps':>8} {'roofline':>10} {'reached':>8}"]
    for r, model in zip(records, models):
        if "error" in r:
            lines.append(f"{model:{mw}} {r['run']:28} ERROR {r['error']}")
            continue
        speed = f"{r['out_tok_per_s'] / base['out_tok_per_s']:.2f}x" if base else "-"
        roof = r.get("roofline") or {}
        name = f"{r['backend']} {r['config']}" + (f" {r['model_runner']}" if "model_runner" in r
                                                  else "")
        roof_s = (f"{roof['out_tok_per_s']:>10.0f} {roof['pct_reached']:>7.1f}%" if roof
                  else f"{'-':>10} {'-':>8}")
        seps = r.get("output_separator_rate")
        lines.append(
            f"{model:{mw}} {name:28} {r['out_tok_per_s']:>10.0f} {r['total_tok_per_s']:>12.0f} "
            f"{speed:>9} {r['peak_kv_blocks']:>11} {r['blocks_per_request']:>10.1f} "
            f"{r['max_concurrency']:>9} {r['retained_ratio']:>9.3f} "
            f"{'-' if seps is None else f'{seps:.3f}':>8} {roof_s}")
    r0 = next((r for r in records if "error" not in r), None)
    if r0:
        lines.append(f"workload {r0['workload']}: {r0['num_requests']} x ({r0['prompt_tokens']} "
                     f"prompt + {r0['output_tokens']} output), prompts {r0['prompts']}, replay "
                     f"{r0['replay']}, {r0['gpu']}, vLLM {r0.get('vllm_version')}, commit "
                     f"{r0.get('commit')}")
        if r0.get("roofline"):
            rf = r0["roofline"]
            lines.append(f"roofline: prefill FLOPs / {rf['bf16_tflops']:.0f} TFLOP/s + decode "
                         f"steps, each max((weights + batch x retained KV) / {rf['hbm_tbps']} "
                         "TB/s, step FLOPs / peak); see README")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> bool:
    """Out tok/s and peak KV blocks per run (bar charts); False where matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in records if "error" not in r]
    if not ok:
        return False
    names = [f"{r['backend']}\n{r['config']}" for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(ok), 4.5))
    bars = ax1.bar(names, [r["out_tok_per_s"] for r in ok], color="tab:blue")
    roofs = [(r.get("roofline") or {}).get("out_tok_per_s") for r in ok]
    if any(roofs):
        ax1.scatter(names, [x or float("nan") for x in roofs], marker="_", s=900,
                    color="black", label="roofline")
        ax1.legend()
    ax1.bar_label(bars, fmt="%.0f")
    ax1.set_ylabel("output tokens / s")
    ax2.bar(names, [r["peak_kv_blocks"] for r in ok], color="tab:orange")
    ax2.bar_label(ax2.containers[0], fmt="%d")
    ax2.set_ylabel(f"peak KV blocks (of {ok[0]['num_kv_blocks']}, {ok[0]['block_size']} tok)")
    r0 = ok[0]
    fig.suptitle(f"{r0.get('model', '')} {r0['workload']}: {r0['num_requests']} x "
                 f"({r0['prompt_tokens']} + {r0['output_tokens']}), replay {r0['replay']}, "
                 f"{r0['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fit_vocab_to_tokenizer(model_dir: Path) -> None:
    """Widen a dummy model's vocabulary to its tokenizer's where the tokenizer has more ids
    (Mistral 7B's 32,768 under SmolLM2's 49,152): prompt ids past the embedding table, or
    replayed ids past the logits, would fault. The LM head grows with it (Mistral: +134 MB read
    per decode step, on 14.5 GB); the record's ``vocab_size`` says what ran."""
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(model_dir))
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if n > cfg["vocab_size"]:
        print(f"{model_dir.name}: vocab_size {cfg['vocab_size']} -> {n} (the tokenizer's)")
        path.write_text(json.dumps(dict(cfg, vocab_size=n), indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="W0", choices=sorted(WORKLOADS))
    p.add_argument("--runs", nargs="+", default=["FLASH_ATTN", "SEPLLM:a4s64w256"])
    p.add_argument("--run", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--model", default=None, help="HF folder; default: a dummy-weight shape")
    p.add_argument("--model-shape", default="llama3-8b", choices=list(SHAPES),
                   help="dummy-weight model shape (common.SHAPES) when --model is not given")
    p.add_argument("--tokenizer-dir", default=".gpu/tok")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.0)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="vLLM's kv_cache_dtype (auto: the model's; fp8: one byte per element)")
    p.add_argument("--fast-start", action="store_true",
                   help="no torch.compile, full CUDA graphs of decode-only steps: an engine "
                        "starts in ~30 s instead of ~70 s on the H200")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM tensor parallelism (the roofline counts that many GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default="real-text", choices=["real-text", "vllm-random"],
                   help="real-text (default): cut from public-domain text, outputs replayed; "
                        "vllm-random: vllm bench throughput's random dataset, no replay")
    p.add_argument("--no-replay", action="store_true",
                   help="let the model pick output tokens (greedy) instead of replaying text")
    p.add_argument("--hbm-tbps", type=float, default=None,
                   help=f"roofline HBM bandwidth (default on a GPU: {H200_HBM_TBPS}, H200)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"roofline bf16 peak (default on a GPU: {H200_BF16_TFLOPS}, H200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="vLLM's torch profiler in the engine core over N steps (record: "
                        "'profile', kernel ms per step)")
    p.add_argument("--profile-trace", default=None, metavar="DIR",
                   help="with --profile-steps: copy the engine core's Chrome trace here "
                        "(trace_gaps.py reads it; the record's profile.timeline is its summary)")
    p.add_argument("--profile-delay", type=int, default=600, metavar="K",
                   help="engine steps before the profiled ones (past the prefill)")
    p.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--out", default=None, help="JSON path; the plot goes next to it (.png)")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the table and plot of a result")
    args = p.parse_args()
    if args.profile_trace and not args.profile_steps:
        p.error("--profile-trace needs --profile-steps")

    if args.plot_only:
        records = json.loads(Path(args.plot_only).read_text())
        print(report_table(records))
        png = Path(args.plot_only).with_suffix(".png")
        print(f"plot: {png}" if plot(records, png) else NO_PLOT)
        return
    if args.run:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    if args.model is None:
        tmp = tempfile.mkdtemp(prefix="sepllm-model-")
        args.model = str(make_dummy_model(Path(tmp) / args.model_shape,
                                          Path(args.tokenizer_dir), SHAPES[args.model_shape]))
        fit_vocab_to_tokenizer(Path(args.model))
    records = []
    for i, spec in enumerate(args.runs):
        cmd = [sys.executable, __file__, "--run", spec]
        for k, v in vars(args).items():
            if k in ("run", "runs", "out", "plot_only") or v in (None, False, 0, 0.0):
                continue
            cmd += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}",
                                                                   str(v)]
        print(f"[{i + 1}/{len(args.runs)}] {spec}\n+ " + " ".join(cmd), flush=True)
        # stderr (vLLM's log and the progress bar) goes to the terminal; stdout is parsed.
        env = dict(os.environ)
        if split_runner(spec)[1] is not None:
            env["VLLM_USE_V2_MODEL_RUNNER"] = split_runner(spec)[1]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:])
            records.append({"workload": args.workload, "model": Path(args.model).name,
                            "kv_cache_dtype": args.kv_cache_dtype, "run": spec,
                            "error": proc.returncode})
        else:
            records.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(records[-1]), flush=True)
        if args.out:  # after every run: a run cut by a caller's time limit keeps the earlier ones
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(records, indent=1))
    print("\n" + report_table(records))
    if args.out:
        png = Path(args.out).with_suffix(".png")
        print(f"wrote {args.out}" + (f" and {png}" if plot(records, png) else
                                     f"; {NO_PLOT} (--plot-only {args.out} draws it)"))

if __name__ == "__main__":
    main()
