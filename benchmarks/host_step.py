"""Scheduler-side host time of one decode step at N running requests: vLLM alone vs SEPLLM.

    python3 benchmarks/host_step.py --num-requests 512 --steps 200
    python3 benchmarks/host_step.py --tokenizer-dir .gpu/tok       # on the H200 host (config only)
    python3 benchmarks/host_step.py --sepllm '{"num_sinks": 4, "sep_cap": 64, "window": 256,
                                               "cache_size": 356}'

No model, no worker: vLLM's real scheduler class the engine would use (``AsyncScheduler`` with
KV-peak tracing for the baseline, ``SepLLMAsyncScheduler`` for SEPLLM) over a real block pool,
driven as EngineCore drives it: ``schedule()`` then ``update_from_output()`` with one sampled
token per request (a real-text continuation, so separators come at their natural rate). Times
the steady decode steps after every prompt is in (``--warmup`` steps skipped), alternating the
two schedulers step by step so that machine noise hits both alike. Reports ms per step (median,
and the mean of the fastest half) for schedule and update each. Hosts differ in speed (a lent
H200 host ran it ~1.4x faster than our CPU, an earlier one much slower), so read differences
between the two schedulers measured together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(backend: str, model: str, sepllm: dict | None, num_blocks: int, max_num_seqs: int,
          max_batched: int, block_size: int = 16):
    """The scheduler EngineCore would build for ``backend`` (one KV group, ``num_blocks``)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    import torch

    kwargs = dict(model=model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                  enable_prefix_caching=False, block_size=block_size, async_scheduling=True,
                  max_model_len=8192)
    if backend == "SEPLLM":
        import vllm_sepllm.patches as patches

        patches.install()
        kwargs["attention_backend"] = "SEPLLM"
        kwargs["additional_config"] = {"sepllm": sepllm or {}}
    else:
        kwargs["scheduler_cls"] = "vllm_sepllm.instrument.TrackingAsyncScheduler"
    vllm_config = EngineArgs(**kwargs).create_engine_config()
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=8, head_size=128,
                             dtype=torch.bfloat16)
    if backend == "SEPLLM":
        from vllm_sepllm.kv_manager import SepLLMSpec

        spec = SepLLMSpec.from_full(spec)
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    cls = vllm_config.scheduler_config.get_scheduler_cls()
    sched = cls(vllm_config=vllm_config, kv_cache_config=kv_config,
                structured_output_manager=StructuredOutputManager(vllm_config),
                block_size=block_size, log_stats=True)
    return sched


class Driver:
    """Feeds one scheduler its requests and fakes the model's outputs."""

    def __init__(self, sched, prompts: list[list[int]], conts: list[list[int]], out_len: int):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        self.sched = sched
        self.conts = {}
        for i, (p, c) in enumerate(zip(prompts, conts)):
            rid = f"r{i}"
            sched.add_request(Request(rid, list(p), SamplingParams(max_tokens=out_len,
                                                                   ignore_eos=True), None))
            self.conts[rid] = c
        self.last_output = None

    def step(self) -> tuple[float, float, int]:
        """One engine step; (schedule s, update s, decode rows)."""
        from vllm.v1.outputs import ModelRunnerOutput

        t0 = time.perf_counter()
        out = self.last_output = self.sched.schedule()
        t1 = time.perf_counter()
        # The model's output for this step's requests (a prefill chunk that does not end the
        # prompt samples nothing).
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        decode = 0
        for rid in req_ids:
            req = self.sched.requests[rid]
            q = out.num_scheduled_tokens[rid]
            if req.num_computed_tokens < req.num_prompt_tokens:  # chunk still inside prompt
                sampled.append([])
                continue
            decode += q == 1
            cont = self.conts[rid]  # the token this step samples: index = outputs so far
            sampled.append([cont[min(req.num_output_tokens, len(cont) - 1)]])
        mro = ModelRunnerOutput(req_ids=req_ids,
                                req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled)
        t2 = time.perf_counter()
        self.sched.update_from_output(out, mro)
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200, help="decode steps timed")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--sepllm", default='{"num_sinks": 4, "sep_cap": 64, "window": 256}')
    p.add_argument("--num-blocks", type=int, default=200_000)
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2, built locally)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="instead of --model: Llama-3-8B's config with this tokenizer (the H200)")
    p.add_argument("--out", default=None, help="JSON result")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from benchmarks.common import real_prompts_and_continuations
    from vllm_sepllm.testing.model import smollm2_path

    if args.tokenizer_dir:
        import tempfile

        from benchmarks.common import LLAMA3_8B, make_dummy_model

        model = str(make_dummy_model(Path(tempfile.mkdtemp(prefix="sepllm-host-")) / "llama3",
                                     Path(args.tokenizer_dir), LLAMA3_8B))
    else:
        model = args.model or smollm2_path()
    out_len = args.warmup + args.steps + 64
    prompts, conts = real_prompts_and_continuations(AutoTokenizer.from_pretrained(model),
                                                    args.num_requests, args.prompt_len, out_len)
    sepllm = json.loads(args.sepllm)
    drivers = {}
    for backend in ("FLASH_ATTN", "SEPLLM"):
        sched = build(backend, model, sepllm, args.num_blocks, max(1024, args.num_requests),
                      16384)
        drivers[backend] = Driver(sched, prompts, conts, out_len)
    # Prefill until every request decodes, then warm up.
    for name, d in drivers.items():
        while True:
            _, _, dec = d.step()
            if dec == args.num_requests:
                break
        for _ in range(args.warmup):
            d.step()
    times = {name: ([], []) for name in drivers}
    for _ in range(args.steps):
        for name, d in drivers.items():
            s, u, dec = d.step()
            assert dec == args.num_requests, (name, dec)
            times[name][0].append(s * 1e3)
            times[name][1].append(u * 1e3)

    def fast_half(xs):
        xs = sorted(xs)[: max(1, len(xs) // 2)]
        return sum(xs) / len(xs)

    rows = {}
    print(f"{args.num_requests} decoding requests, {args.steps} steps, ms per step "
          f"(median / mean of the fastest half); SEPLLM {args.sepllm}")
    for name, (s, u) in times.items():
        tot = [a + b for a, b in zip(s, u)]
        rows[name] = {"schedule_ms": statistics.median(s), "update_ms": statistics.median(u),
                      "total_ms": statistics.median(tot), "total_fast_half_ms": fast_half(tot)}
        print(f"  {name:10s} schedule {statistics.median(s):6.2f}  update "
              f"{statistics.median(u):6.2f}  total {statistics.median(tot):6.2f} / "
              f"{fast_half(tot):6.2f}")
    d = rows["SEPLLM"]["total_ms"] - rows["FLASH_ATTN"]["total_ms"]
    print(f"  SEPLLM - vLLM alone: {d:+.2f} ms per step")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
