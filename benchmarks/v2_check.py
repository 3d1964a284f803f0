"""SEPLLM on vLLM's V2 model runner: greedy tokens equal the V1 runner's for the same weights.

    python3 benchmarks/v2_check.py --out DIR          # on a CUDA machine; DIR/v2_check.json

Weights: a small random Llama checkpoint written once (seeded, float32 on disk), SmolLM2's
tokenizer (``.gpu/tok`` on the lent H200), real-text prompts (``.bench-data``). For each
configuration two fresh engines run the same requests, one per subprocess, at the same time on
the same GPU: ``VLLM_USE_V2_MODEL_RUNNER=0`` (V1) and ``=1`` (V2). Each reports which runner
class it actually ran (``collective_rpc`` into its in-process worker) and, on V2, the SepLLM V2
counters of ``worker_v2.SepLLMV2RunnerMixin`` (steps with shifted cache indices, compactions,
copy-outs, masked one-token steps, CUDA-graph mode per step).

Every engine: CUDA graphs on (``FULL_AND_PIECEWISE``, not eager), prefix caching on, chunked
prefill (``max_num_batched_tokens`` 512), so steps are mixed prefill + decode (PIECEWISE or
eager) and then all-decode (FULL graph replay). Two phases: 12 prompts of 161 to 700 tokens,
then 12 more: four repeats of phase-1 prompts whose length is ``16k + 1`` (prefix hits up to
the last token: a one-token first step that still needs the SepLLM mask, ``masked_single``, in
exact mode), four sharing a phase-1 prefix, four fresh. SepLLM a4 s16 w64 (every request evicts
hundreds of tokens).

Configurations (``--configs``): ``exact_fp32`` (float32, our Triton decode kernel, exact
eviction: the masked Triton prefill), ``exact_bf16`` (bfloat16, FlashAttention decode, exact
eviction), ``batched_bf16`` (bfloat16, FlashAttention for every step: batched eviction
``cache_size`` 120, no per-slot records).

Compared per request: the greedy tokens, the first divergence if any (with both sides' log-prob
gap between the two tokens there: a near tie, below ``--tie-eps``, is bf16/fp32 noise, not a
bug), the largest log-prob difference of the common prefix, the KV figures (evicted/retained
must match when the tokens do). The run passes when no request diverges other than by a near
tie, the V2 engine ran the V2 runner class and the V1 engine the V1 one, every request evicted,
phase 2 hit the prefix cache, and the V2 counters show FULL-graph decode steps, mixed steps,
shifted cache indices, compactions, copy-outs and (exact modes) masked one-token steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = {  # small Llama, SmolLM2's vocabulary
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 4096, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}
SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
#: name -> engine dtype, decode kernel (None: the default, FlashAttention on the H200),
#: SepLLM settings, whether masked one-token steps must occur.
CONFIGS = {
    "exact_fp32": ("float32", "triton", SEPLLM, True),
    "exact_bf16": ("bfloat16", None, SEPLLM, True),
    "batched_bf16": ("bfloat16", None, dict(SEPLLM, cache_size=120), False),
}
#: Near-tie threshold of a first divergence (log-prob gap on both sides), per dtype.
TIE_EPS = {"float32": 1e-3, "bfloat16": 5e-2}
TOP_LOGPROBS = 5
BLOCK = 16
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 512]


def make_requests(tokenizer, seed: int = 1) -> list[dict]:
    """The two phases: ``{"prompts": [...], "max_tokens": [...]}`` each (module docstring)."""
    from benchmarks.common import real_prompt_ids

    pool = real_prompt_ids(tokenizer, 28, 720, seed=seed)
    # Phase 1: lengths 161..700, every other one 16k + 1 (a full-block prefix hit leaves one
    # token to compute).
    lens1 = [161, 190, 241, 305, 337, 368, 401, 450, 513, 577, 641, 700]
    phase1 = [p[:n] for p, n in zip(pool[:12], lens1)]
    repeats = [phase1[i] for i in (0, 3, 6, 9)]  # 161, 305, 401, 577: 16k + 1
    shared = [phase1[i][:16 * (8 + 3 * k)] + pool[12 + k][:100 + 37 * k]
              for k, i in enumerate((1, 4, 7, 10))]
    fresh = [p[:200 + 111 * k] for k, p in enumerate(pool[16:20])]
    phase2 = repeats + shared + fresh
    return [{"prompts": ph, "max_tokens": [24 + 8 * (i % 4) for i in range(len(ph))]}
            for ph in (phase1, phase2)]


def runner_info(worker) -> dict:
    """On the worker (in-process engine): the model runner actually running and SepLLM's V2
    counters."""
    runner = worker.model_runner
    mro = type(runner).__mro__
    info = {
        "class": type(runner).__name__,
        "mro": [f"{c.__module__}.{c.__qualname__}" for c in mro[:3]],
        "v2": any(c.__module__ == "vllm.v1.worker.gpu.model_runner" for c in mro),
        "sepllm_v2_stats": dict(getattr(runner, "sepllm_v2_stats", None) or {}),
        "cudagraph_mode": str(runner.compilation_config.cudagraph_mode),
    }
    try:
        info["decode_kernel"] = runner.attn_groups[0][0].get_metadata_builder(0).decode_kernel
    except Exception as e:  # noqa: BLE001 - diagnostics only
        info["decode_kernel"] = f"? ({type(e).__name__})"
    return info


def run_one(args) -> None:
    """One engine (this process): both phases, then one RESULT line of JSON."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process worker: collective_rpc
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(args.run).read_text())
    dtype, _, sepllm, _ = CONFIGS[args.config]
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], attention_backend="SEPLLM", dtype=dtype, seed=0,
              additional_config={"sepllm": sepllm}, block_size=BLOCK,
              enable_prefix_caching=True, enable_chunked_prefill=True,
              max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512,
              kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.3,
              compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
    rec = {"runner_env": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"),
           "startup_s": round(time.perf_counter() - t0, 1),
           "async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config
                                    .async_scheduling),
           "phases": []}
    t0 = time.perf_counter()
    for phase in spec["phases"]:
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True,
                                 logprobs=TOP_LOGPROBS) for m in phase["max_tokens"]]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in phase["prompts"]],
                            params, use_tqdm=False)
        rec["phases"].append([{
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()}
                         for step in (o.outputs[0].logprobs or [])],
            "kv": (o.kv_transfer_params or {}).get("sepllm"),
            "cached": o.num_cached_tokens or 0,
        } for o in outs])
    rec["generate_s"] = round(time.perf_counter() - t0, 2)
    rec["runner"] = llm.collective_rpc(runner_info)[0]
    print("RESULT " + json.dumps(rec), flush=True)
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:  # no interpreter teardown (compile workers, CUDA): the result is out
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _lp(step: dict, token: int) -> float:
    value = step.get(str(token))
    return -math.inf if value is None else value


def compare(v1: dict, v2: dict, eps: float) -> dict:
    """Per request: first divergence (and whether it is a near tie), log-prob drift of the
    common prefix, KV figures; and a verdict: equal | tie_flips_only | mismatch."""
    rows, ties, real = [], 0, 0
    max_drift = 0.0
    for ph, (p1, p2) in enumerate(zip(v1["phases"], v2["phases"])):
        for i, (a, b) in enumerate(zip(p1, p2)):
            ta, tb = a["tokens"], b["tokens"]
            d = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
            if d is None and len(ta) != len(tb):
                d = min(len(ta), len(tb))
            upto = len(ta) if d is None else d
            drift = max((abs(_lp(a["logprobs"][k], ta[k]) - _lp(b["logprobs"][k], tb[k]))
                         for k in range(min(upto, len(a["logprobs"]), len(b["logprobs"])))),
                        default=0.0)
            max_drift = max(max_drift, drift)
            row = {"phase": ph + 1, "request": i, "equal": d is None, "first_divergence": d,
                   "prefix_logprob_drift": drift,
                   "kv_equal": a["kv"] == b["kv"],
                   "evicted": [(r["kv"] or {}).get("kv_evicted") for r in (a, b)],
                   "cached": [a["cached"], b["cached"]]}
            if d is not None:
                tie = False
                if d < min(len(ta), len(tb)):
                    x, y = ta[d], tb[d]
                    gap1 = _lp(a["logprobs"][d], x) - _lp(a["logprobs"][d], y)
                    gap2 = _lp(b["logprobs"][d], y) - _lp(b["logprobs"][d], x)
                    row["gaps"] = [g if math.isfinite(g) else None for g in (gap1, gap2)]
                    tie = gap1 <= eps and gap2 <= eps
                row["near_tie"] = tie
                ties += tie
                real += not tie
            rows.append(row)
    if not ties and not real:
        verdict = "equal" if max_drift <= eps else "logprob_drift"
    elif not real and max_drift <= eps:
        verdict = "tie_flips_only"
    else:
        verdict = "mismatch"
    return {"verdict": verdict, "requests": len(rows),
            "requests_equal": sum(r["equal"] for r in rows),
            "mismatching_requests": sum(not r["equal"] for r in rows),
            "near_tie_divergences": ties, "max_prefix_logprob_drift": max_drift,
            "kv_equal": sum(r["kv_equal"] for r in rows), "rows": rows}


def checks_of(name: str, runs: dict, cmp: dict) -> list[str]:
    """The failed checks of one configuration (empty: passed)."""
    fails = []
    must_mask = CONFIGS[name][3]
    for side, want_v2 in (("v1", False), ("v2", True)):
        run = runs.get(side)
        if run is None or "error" in run:
            fails.append(f"{side}: no result ({(run or {}).get('error', 'missing')})")
            continue
        info = run["runner"]
        if info["v2"] != want_v2:
            fails.append(f"{side}: ran {info['class']} ({info['mro']}), not the "
                         f"{'V2' if want_v2 else 'V1'} runner")
        ev = [(r["kv"] or {}).get("kv_evicted") or 0 for ph in run["phases"] for r in ph]
        if not all(e > 0 for e in ev):
            fails.append(f"{side}: requests that evicted nothing: {ev.count(0)}")
        if sum(r["cached"] for r in run["phases"][1]) <= 0:
            fails.append(f"{side}: phase 2 hit no prefix-cached token")
    if fails:
        return fails
    if cmp["verdict"] not in ("equal", "tie_flips_only"):
        fails.append(f"tokens: {cmp['verdict']} ({cmp['mismatching_requests']} requests differ, "
                     f"{cmp['near_tie_divergences']} of them at near ties; prefix log-prob "
                     f"drift {cmp['max_prefix_logprob_drift']:.3g})")
    stats = runs["v2"]["runner"]["sepllm_v2_stats"]
    need = {"cg_FULL": "FULL-graph decode steps", "shifted_steps": "shifted cache indices",
            "compaction_steps": "compactions", "moved_slots": "KV moves",
            "copy_outs": "copy-outs (prefix caching)"}
    if must_mask:
        need["masked_single_steps"] = "masked one-token steps"
    for key, what in need.items():
        if not stats.get(key):
            fails.append(f"v2: no {what} ({key}=0)")
    if not stats.get("cg_PIECEWISE", 0) + stats.get("cg_NONE", 0):
        fails.append("v2: no mixed (PIECEWISE or eager) steps")
    return fails


def _run_side(args, name: str, side: str, spec: Path, cache_root: Path) -> dict:
    dtype, kernel, _, _ = CONFIGS[name]
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1" if side == "v2" else "0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])),
               # Separate vLLM caches: the two engines of a pair compile at the same time.
               VLLM_CACHE_ROOT=str(cache_root / f"{name}_{side}"))
    if kernel is not None:
        env["VLLM_SEPLLM_DECODE_KERNEL"] = kernel
    cmd = [sys.executable, __file__, "--run", str(spec), "--config", name]
    log = Path(args.out) / f"v2_check_{name}_{side}.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env,
                                  timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s (log {log.name})"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    with open(log, "a") as f:
        f.write("\n--- stdout ---\n" + "\n".join(ln for ln in proc.stdout.splitlines()
                                                   if not ln.startswith("RESULT ")))
    if proc.returncode or not lines:
        tail = log.read_text()[-1500:] if log.exists() else ""
        return {"error": f"rc {proc.returncode} after {time.perf_counter() - t0:.0f} s "
                         f"(log {log.name}): ...{tail}"}
    return json.loads(lines[-1][len("RESULT "):])


def _tokenizer_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if (ROOT / ".gpu" / "tok").is_dir():
        return ROOT / ".gpu" / "tok"
    from vllm_sepllm.testing.model import smollm2_path

    return Path(smollm2_path())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder for v2_check.json and the engines' logs")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated of "
                   + ", ".join(CONFIGS))
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--timeout", type=int, default=300, help="seconds per engine run")
    p.add_argument("--sequential", action="store_true",
                   help="run V1 and V2 one after the other (default: at the same time)")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one engine
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run is not None:
        run_one(args)
        return 0

    t_start = time.perf_counter()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="v2_check_"))
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    from transformers import AutoTokenizer

    from benchmarks.common import environment, make_random_model

    work = Path(tempfile.mkdtemp(prefix="v2_check_work_"))
    tok_dir = _tokenizer_dir(args.tokenizer_dir)
    model = make_random_model(work / "llama-small", tok_dir, SHAPE, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    spec = work / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "phases": make_requests(tokenizer)}))

    summary: dict = {"shape": SHAPE, "configs": {}, "environment": environment()}
    all_fails = []
    for name in names:
        t0 = time.perf_counter()
        if args.sequential:
            runs = {side: _run_side(args, name, side, spec, work) for side in ("v1", "v2")}
        else:
            with ThreadPoolExecutor(2) as pool:
                futures = {side: pool.submit(_run_side, args, name, side, spec, work)
                           for side in ("v1", "v2")}
                runs = {side: f.result() for side, f in futures.items()}
        ok = all("error" not in r for r in runs.values())
        cmp = compare(runs["v1"], runs["v2"], TIE_EPS[CONFIGS[name][0]]) if ok else {
            "verdict": "no_result"}
        fails = checks_of(name, runs, cmp)
        all_fails += [f"{name}: {f}" for f in fails]
        evicted = {side: sum((r["kv"] or {}).get("kv_evicted") or 0
                             for ph in run["phases"] for r in ph)
                   for side, run in runs.items() if "error" not in run}
        cached = {side: sum(r["cached"] for r in run["phases"][1])
                  for side, run in runs.items() if "error" not in run}
        entry = {
            "passed": not fails, "failed_checks": fails,
            "dtype": CONFIGS[name][0], "decode_kernel_env": CONFIGS[name][1],
            "sepllm": CONFIGS[name][2],
            **{k: v for k, v in cmp.items() if k != "rows"},
            "evicted_tokens": evicted, "phase2_prefix_hit_tokens": cached,
            "runner": {side: run.get("runner") for side, run in runs.items()},
            "errors": {side: run["error"] for side, run in runs.items() if "error" in run},
            "startup_s": {side: run.get("startup_s") for side, run in runs.items()},
            "generate_s": {side: run.get("generate_s") for side, run in runs.items()},
            "async_scheduling": {side: run.get("async_scheduling") for side, run in runs.items()},
            "wall_s": round(time.perf_counter() - t0, 1),
            "per_request": cmp.get("rows"),
        }
        summary["configs"][name] = entry
        v2 = (entry["runner"].get("v2") or {})
        print(f"{name}: {'PASS' if not fails else 'FAIL'} verdict={cmp['verdict']} "
              f"equal {cmp.get('requests_equal', 0)}/{cmp.get('requests', 0)} requests, "
              f"evicted {evicted}, prefix hits {cached}, runners "
              f"{[(entry['runner'].get(s) or {}).get('class') for s in ('v1', 'v2')]}, "
              f"v2 stats {v2.get('sepllm_v2_stats')}, {entry['wall_s']} s"
              + "".join(f"\n  - {f}" for f in fails), flush=True)
    summary["passed"] = not all_fails
    summary["failed_checks"] = all_fails
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    path = out / "v2_check.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"{'PASSED' if not all_fails else 'FAILED'} in {summary['total_s']} s; {path}")
    return 0 if not all_fails else 1


if __name__ == "__main__":
    raise SystemExit(main())
