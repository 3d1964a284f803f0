"""Where the time of an engine step goes: cProfile, or a CPU + GPU timeline of decode steps.

    python3 benchmarks/profile_step.py --num-requests 512 --prompt-len 1024 --output-len 256 \\
        --out /tmp/profile.txt
    # steady decode steps (all requests prefilled): wall time per step without a profiler, then
    # torch.profiler over N steps: GPU kernel time per step and the top ops on both sides
    python3 benchmarks/profile_step.py --timeline 20 --backend FLASH_ATTN --out /tmp/fa.txt

Runs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so one cProfile
sees scheduler, model runner and attention-metadata builder. Same prompts, replay
and settings as benchmarks/throughput.py (Llama-3-8B shape, dummy weights on a GPU; SmolLM2 with
real weights on CPU). cProfile inflates Python-heavy code, so read shares, not absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="SEPLLM")
    p.add_argument("--sepllm", default='{"num_sinks": 4, "sep_cap": 64, "window": 256}')
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--model", default=None, help="HF folder (default: Llama-3-8B shape, dummy)")
    p.add_argument("--load-format", default=None,
                   help="vLLM load format for --model (e.g. dummy: a config-only folder, such "
                        "as a tiny Llama for the host phases on CPU)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV pool size (on CPU, instead of a share of the machine's memory)")
    p.add_argument("--top", type=int, default=70)
    p.add_argument("--timeline", type=int, default=0, metavar="N",
                   help="instead of cProfile: wall time of steady decode steps, then "
                        "torch.profiler (CPU + CUDA) over N of them")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import json

    import numpy as np
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.common import LLAMA3_8B, make_dummy_model, real_prompts_and_continuations
    from benchmarks.replay import FQCN

    work = Path(tempfile.mkdtemp(prefix="sepllm-prof-"))
    kwargs = {}
    if args.model is None:
        args.model = str(make_dummy_model(work / "llama3-8b", ROOT / ".gpu" / "tok", LLAMA3_8B))
        kwargs["load_format"] = "dummy"
    elif args.load_format:
        kwargs["load_format"] = args.load_format
    if args.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    tok = AutoTokenizer.from_pretrained(args.model)
    n, plen, olen = args.num_requests, args.prompt_len, args.output_len
    prompts, conts = real_prompts_and_continuations(tok, n, plen, olen, seed=0)
    cont_file = work / "continuations.npy"
    np.save(cont_file, np.asarray(conts, dtype=np.int32))
    if args.backend == "SEPLLM":
        kwargs["additional_config"] = {"sepllm": json.loads(args.sepllm)}
    llm = LLM(args.model, attention_backend=args.backend, max_model_len=plen + olen + 16,
              enable_prefix_caching=False, max_num_seqs=max(n, 256), seed=0,
              logits_processors=[FQCN], **kwargs)
    params = [SamplingParams(max_tokens=olen, ignore_eos=True, temperature=0.0,
                             extra_args={"replay": {"file": str(cont_file), "row": i}})
              for i in range(n)]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    if args.timeline:
        text = timeline(llm, inputs, params, args)
        Path(args.out).write_text(text)
        print(text[:4000])
        return
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    outs = llm.generate(inputs, params, use_tqdm=False)
    prof.disable()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    buf = io.StringIO()
    buf.write(f"{args.backend} {n} x ({plen} + {olen}): {elapsed:.1f} s under cProfile, "
              f"{out_tokens / elapsed:.0f} out tok/s\n")
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top // 2)
    Path(args.out).write_text(buf.getvalue())
    print(buf.getvalue()[:3000])


#: Host phases timed per decode step in --timeline (inclusive wall time; nested phases overlap:
#: vLLM's ``Scheduler.schedule`` runs inside SepLLM's, the runner's ``_prepare_inputs`` inside
#: ``execute_model``). Missing names (the other backend's classes) are skipped.
PHASES = [
    "vllm_sepllm.scheduler:_SepLLMSchedulerMixin.schedule",
    "vllm.v1.core.sched.scheduler:Scheduler.schedule",
    "vllm_sepllm.kv_manager:SepLLMManager.evict_batch",
    "vllm_sepllm.cache_table:CacheTable.advance",
    "vllm_sepllm.kv_manager:SepLLMManager.evict",
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
    "vllm_sepllm.worker:SepLLMRunnerMixin._update_states",
    "vllm_sepllm.worker:SepLLMRunnerMixin._sepllm_compact",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
    "vllm_sepllm.worker:SepLLMRunnerMixin._prepare_inputs",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._build_attention_metadata",
    "vllm_sepllm.worker_v2:SepLLMV2RunnerMixin.update_requests",
    "vllm_sepllm.worker_v2:SepLLMV2RunnerMixin.prepare_inputs",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward",
    "vllm.v1.engine.output_processor:OutputProcessor.process_outputs",
]


class PhaseTimer:
    """Wrap ``module:Class.method`` names with wall-clock accumulators (seconds, calls)."""

    def __init__(self, names: list[str]) -> None:
        import importlib

        self.totals: dict[str, list[float]] = {}
        self._undo = []
        for name in names:
            mod, _, attr = name.partition(":")
            cls_name, _, meth = attr.partition(".")
            try:
                cls = getattr(importlib.import_module(mod), cls_name)
            except (ImportError, AttributeError):
                continue
            orig = cls.__dict__.get(meth)
            if orig is None:
                continue
            acc = self.totals.setdefault(attr, [0.0, 0])

            def wrapped(*a, __orig=orig, __acc=acc, **k):
                t0 = time.perf_counter()
                try:
                    return __orig(*a, **k)
                finally:
                    __acc[0] += time.perf_counter() - t0
                    __acc[1] += 1

            setattr(cls, meth, wrapped)
            self._undo.append((cls, meth, orig))

    def reset(self) -> None:
        for acc in self.totals.values():
            acc[0], acc[1] = 0.0, 0

    def restore(self) -> None:
        for cls, meth, orig in self._undo:
            setattr(cls, meth, orig)

    def lines(self, steps: int) -> list[str]:
        return [f"  {name:58} {acc[0] * 1e3 / steps:8.2f} ms/step  ({acc[1]} calls)"
                for name, acc in self.totals.items() if acc[1]]


def timeline(llm, inputs, params, args) -> str:
    """Drive the in-process engine step by step. Once every request is prefilled and decoding:
    wall time of 2N plain steps, then torch.profiler over N steps (GPU kernel time per step
    against wall time per step says whether the GPU or the host bounds the step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    for i, (inp, par) in enumerate(zip(inputs, params)):
        engine.add_request(f"t{i}", inp, par)

    def all_decoding() -> bool:
        return not sched.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens
                                         for r in sched.running)

    prefill_steps = 0
    while not all_decoding():
        engine.step()
        prefill_steps += 1
    for _ in range(5):
        engine.step()
    n = args.timeline
    cuda = torch.cuda.is_available()

    def ms_per_step(steps: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / steps

    wall_ms = ms_per_step(2 * n)
    # The same number of steps again with every host phase timed (adds a few us per call).
    phases = PhaseTimer(PHASES)
    phased_ms = ms_per_step(2 * n)
    phases.restore()
    running = len(sched.running)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    ka = prof.key_averages()
    # Kernels (device-side events) only: their summed self time is the GPU busy time.
    gpu_us = sum(e.self_device_time_total for e in ka
                 if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    lines = [
        f"{args.backend} {args.num_requests} x ({args.prompt_len} + {args.output_len}), "
        f"{running} running, {prefill_steps} prefill steps before",
        f"wall per decode step (no profiler, {2 * n} steps): {wall_ms:.2f} ms",
        f"GPU kernel time per decode step (profiled, {n} steps): {gpu_us / 1e3 / n:.2f} ms"
        if cuda else "no CUDA: CPU ops only",
        f"host phases, inclusive wall time ({2 * n} steps, {phased_ms:.2f} ms per step with "
        "the timers):",
        *phases.lines(2 * n),
        "",
    ]
    sort_gpu = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines.append(ka.table(sort_by=sort_gpu, row_limit=args.top // 2, max_name_column_width=60))
    lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=args.top // 2,
                          max_name_column_width=60))
    for rid in list(sched.requests):  # leave nothing running
        engine.abort_request([rid])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
