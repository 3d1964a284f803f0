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

Per-phase table (median ms per step of each phase, printed before the summary): vLLM's own
``Scheduler.schedule`` and ``update_from_output`` (wrapped on vLLM's class, so SEPLLM's figure
includes our per-request block-demand hooks that vLLM calls), and around them SepLLM's own work:
eviction before vLLM schedules (``vllm:sepllm_eviction_seconds``' timer), the step plan after
it (the rest of our ``schedule``), and our part of ``make_stats``.

Worker side (SEPLLM's rows ``worker: ...``, ``--no-worker`` leaves them out): each step's plan
goes through the V1 model runner's SepLLM hooks (``worker.SepLLMRunnerMixin._update_states``:
KV moves, block-list cuts, ``D``; ``_prepare_inputs``: ``D`` per batch row, cache positions,
``seq_lens``, slot records) on a stand-in runner whose vLLM parts do nothing: CPU tensors,
vLLM's new blocks appended between the two hooks as vLLM's ``_update_states`` does, the KV
moves themselves left out (``ops.compact_kv``: one kernel launch on CUDA, a real copy on a
CPU). The other torch ops run synchronously on the CPU where a GPU would launch kernels, so
read these rows as an estimate of our host work per step there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections import defaultdict
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


#: Methods timed per scheduler instance (inclusive wall time): (module, class, method, phase).
#: vLLM's own methods are wrapped on vLLM's class, so that SepLLM's overrides (which call them
#: through super()) are timed apart from them.
TIMED = [
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule", "vllm_schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output", "vllm_update"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "make_stats", "vllm_make_stats"),
    ("vllm_sepllm.scheduler", "_SepLLMSchedulerMixin", "make_stats", "make_stats"),
]


class MethodTimes:
    """Wall time spent in the :data:`TIMED` methods, summed per (object, phase)."""

    def __init__(self) -> None:
        self.acc: dict[tuple[int, str], float] = defaultdict(float)
        for mod, cls_name, meth, phase in TIMED:
            cls = getattr(importlib.import_module(mod), cls_name, None)
            orig = None if cls is None else cls.__dict__.get(meth)
            if orig is None:
                continue

            def wrapped(obj, *a, __orig=orig, __phase=phase, **k):
                t0 = time.perf_counter()
                try:
                    return __orig(obj, *a, **k)
                finally:
                    self.acc[id(obj), __phase] += time.perf_counter() - t0

            setattr(cls, meth, wrapped)

    def take(self, obj) -> dict[str, float]:
        """Seconds per phase of ``obj`` since the last take (then reset)."""
        key = id(obj)
        out = {ph: t for (o, ph), t in self.acc.items() if o == key}
        for ph in out:
            self.acc[key, ph] = 0.0
        return out


class _Tables:
    """The stand-in runner's ``input_batch.block_table``: one group; vLLM's slot mapping (its
    own work, done again by our hook with cache positions) is not computed."""

    def __init__(self, table) -> None:
        self.table = table

    def __getitem__(self, group: int):
        return self.table

    def compute_slot_mapping(self, *args) -> None:
        return None


class WorkerStub:
    """The V1 runner's SepLLM hooks on a stand-in runner (module docstring, worker side)."""

    def __init__(self, sched, block_size: int, max_reqs: int, max_tokens: int,
                 slot_records: bool) -> None:
        from types import SimpleNamespace

        import numpy as np
        import torch

        import vllm_sepllm.ops
        from vllm_sepllm.worker import SepLLMRunnerMixin, SepLLMWorkerState

        # The moves' copy is device work (a kernel launch on CUDA): left out.
        vllm_sepllm.ops.compact_kv = lambda *args: None

        class VllmParts:  # vLLM's own _update_states / _prepare_inputs: not measured here
            def _update_states(self, scheduler_output):
                return None

            def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
                return None

        cls = type("StubSepLLMRunner", (SepLLMRunnerMixin, VllmParts), {})
        self.cls = cls
        self.sched = sched
        num_blocks = sched.kv_cache_manager.block_pool.num_gpu_blocks
        state = SepLLMWorkerState(sched.sepllm_sep_ids, 1 << 17, max_reqs, torch.device("cpu"))
        state.kv_caches = []
        state.allocate_slots(num_blocks * block_size)
        state.slot_records = slot_records
        self.block_table = bt = SimpleNamespace(
            num_blocks_per_row=np.zeros(max_reqs, dtype=np.int32),
            slot_mapping=SimpleNamespace(gpu=torch.zeros(max_tokens, dtype=torch.int64)))
        bt.add_row = lambda ids, row: bt.num_blocks_per_row.__setitem__(row, len(ids))
        self.batch = SimpleNamespace(req_ids=[], req_id_to_index={}, num_reqs=0,
                                     block_table=_Tables(bt))
        r = object.__new__(cls)
        r.sepllm = state
        r.device = torch.device("cpu")
        r.input_batch = self.batch
        r.requests = {}
        r.req_indices = SimpleNamespace(gpu=torch.arange(max_tokens, dtype=torch.int64))
        r.positions = torch.zeros(max_tokens, dtype=torch.int64)
        r.seq_lens = torch.zeros(max_reqs, dtype=torch.int32)
        r.optimistic_seq_lens_cpu = torch.zeros(max_reqs, dtype=torch.int32)
        r.query_start_loc = SimpleNamespace(gpu=torch.arange(max_reqs + 1, dtype=torch.int32))
        r.input_ids = SimpleNamespace(gpu=torch.zeros(max_tokens, dtype=torch.int32))
        # The running requests as the worker holds them after the scheduler's last step.
        mgr = sched.sepllm_manager
        for req in sched.running:
            rid = req.request_id
            r.requests[rid] = SimpleNamespace(
                block_ids=([b.block_id for b in mgr.req_to_blocks[rid]],))
            state.dropped[rid] = mgr.num_dropped(rid)
        self.runner = r

    def step(self, so) -> tuple[float, float]:
        """Run the two hooks on scheduler output ``so``; (seconds in each)."""
        import torch
        from types import SimpleNamespace

        r, batch, bt = self.runner, self.batch, self.block_table
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.cls._update_states(r, so)
            t1 = time.perf_counter()
        # vLLM's _update_states: finished requests leave, new ones get rows, running ones
        # their new blocks (a one-token decode step per row: positions need no care here).
        for rid in so.finished_req_ids:
            r.requests.pop(rid, None)
        for new in so.scheduled_new_reqs:
            r.requests[new.req_id] = SimpleNamespace(block_ids=(list(new.block_ids[0]),))
        cached = so.scheduled_cached_reqs
        for rid, ids in zip(cached.req_ids, cached.new_block_ids):
            if ids is not None and rid in r.requests:
                blocks = r.requests[rid].block_ids[0]
                if rid in cached.resumed_req_ids:
                    blocks[:] = ids[0]
                else:
                    blocks.extend(ids[0])
        rids = list(so.num_scheduled_tokens)
        if rids != batch.req_ids:
            batch.req_ids = rids
            batch.req_id_to_index = {rid: i for i, rid in enumerate(rids)}
        batch.num_reqs = len(rids)
        for i, rid in enumerate(rids):
            bt.num_blocks_per_row[i] = len(r.requests[rid].block_ids[0])
        with torch.inference_mode():
            t2 = time.perf_counter()
            self.cls._prepare_inputs(r, so, None)
            t3 = time.perf_counter()
        return t1 - t0, t3 - t2


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
        """One engine step; (schedule s, update s, decode rows). SEPLLM's eviction time of the
        step (its own timer, which make_stats resets) goes to ``last_eviction_s``."""
        from vllm.v1.outputs import ModelRunnerOutput

        stats = getattr(self.sched, "sepllm_stats", None)
        ev0 = stats.eviction_seconds if stats is not None else 0.0
        t0 = time.perf_counter()
        out = self.last_output = self.sched.schedule()
        t1 = time.perf_counter()
        stats = getattr(self.sched, "sepllm_stats", None)
        self.last_eviction_s = stats.eviction_seconds - ev0 if stats is not None else 0.0
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
    p.add_argument("--no-worker", action="store_true",
                   help="leave out the worker-side SepLLM hooks (module docstring)")
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
    timer = MethodTimes()
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
    worker = None
    if not args.no_worker:
        # With batched eviction on FlashAttention nothing reads the slot records (worker.py).
        worker = WorkerStub(drivers["SEPLLM"].sched, 16, max(1024, args.num_requests), 16384,
                            slot_records="cache_size" not in sepllm)
    times = {name: ([], []) for name in drivers}
    phases = {name: defaultdict(list) for name in drivers}
    for d in drivers.values():
        timer.take(d.sched)
    for _ in range(args.steps):
        for name, d in drivers.items():
            s, u, dec = d.step()
            assert dec == args.num_requests, (name, dec)
            times[name][0].append(s * 1e3)
            times[name][1].append(u * 1e3)
            for phase, ms in step_phases(s, u, d.last_eviction_s, timer.take(d.sched)).items():
                phases[name][phase].append(ms)
            if worker is not None and name == "SEPLLM":
                a, b = worker.step(d.last_output)
                phases[name]["worker_update"].append(a * 1e3)
                phases[name]["worker_inputs"].append(b * 1e3)
                phases[name]["worker"].append((a + b) * 1e3)

    def fast_half(xs):
        xs = sorted(xs)[: max(1, len(xs) // 2)]
        return sum(xs) / len(xs)

    print(phase_table(phases))
    rows = {}
    print(f"{args.num_requests} decoding requests, {args.steps} steps, ms per step "
          f"(median / mean of the fastest half); SEPLLM {args.sepllm}")
    for name, (s, u) in times.items():
        tot = [a + b for a, b in zip(s, u)]
        rows[name] = {"schedule_ms": statistics.median(s), "update_ms": statistics.median(u),
                      "total_ms": statistics.median(tot), "total_fast_half_ms": fast_half(tot),
                      "phases_ms": {ph: statistics.median(v) for ph, v in phases[name].items()}}
        print(f"  {name:10s} schedule {statistics.median(s):6.2f}  update "
              f"{statistics.median(u):6.2f}  total {statistics.median(tot):6.2f} / "
              f"{fast_half(tot):6.2f}")
    d = rows["SEPLLM"]["total_ms"] - rows["FLASH_ATTN"]["total_ms"]
    print(f"  SEPLLM - vLLM alone: {d:+.2f} ms per step")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


#: Rows of the per-phase table: (key, label).
PHASE_ROWS = [
    ("sepllm_evict", "SepLLM eviction, before vLLM schedules (ours)"),
    ("vllm_schedule", "vLLM Scheduler.schedule (SEPLLM: with our block hooks)"),
    ("sepllm_plan", "SepLLM step plan, after vLLM schedules (ours)"),
    ("vllm_update", "vLLM update_from_output, without make_stats"),
    ("vllm_make_stats", "vLLM make_stats"),
    ("sepllm_stats", "SepLLM make_stats figures (ours)"),
    ("other", "other (KV-peak tracking, our update wrapper)"),
    ("ours", "SepLLM's own work: eviction + plan + figures"),
    ("total", "total: schedule + update_from_output"),
    ("worker_update", "worker: our _update_states (moves, block cuts, D)"),
    ("worker_inputs", "worker: our _prepare_inputs (D rows, positions, records)"),
    ("worker", "worker: our hooks in all (CPU tensors, see docstring)"),
]


def step_phases(schedule_s: float, update_s: float, eviction_s: float,
                methods: dict[str, float]) -> dict[str, float]:
    """One step's phases in ms, from the driver's two outer times, SEPLLM's eviction timer and
    the timed methods (:data:`TIMED`)."""
    vs = methods.get("vllm_schedule", 0.0)
    vu = methods.get("vllm_update", 0.0)
    vms = methods.get("vllm_make_stats", 0.0)
    sepllm = "make_stats" in methods
    ours_stats = methods["make_stats"] - vms if sepllm else 0.0
    out = {"vllm_schedule": vs, "vllm_update": vu - vms - ours_stats, "vllm_make_stats": vms,
           "total": schedule_s + update_s}
    if sepllm:
        plan = schedule_s - vs - eviction_s
        out.update(sepllm_evict=eviction_s, sepllm_plan=plan, sepllm_stats=ours_stats,
                   ours=eviction_s + plan + ours_stats, other=update_s - vu)
    else:
        out["other"] = schedule_s - vs + update_s - vu
    return {k: v * 1e3 for k, v in out.items()}


def phase_table(phases: dict[str, dict[str, list[float]]]) -> str:
    names = list(phases)
    lines = ["per decode step, ms (median of each phase over the steps; medians need not add up)",
             f"  {'phase':56}" + "".join(f"{n:>12}" for n in names)]
    for key, label in PHASE_ROWS:
        cells = [f"{statistics.median(phases[n][key]):12.2f}" if phases[n].get(key)
                 else f"{'-':>12}" for n in names]
        lines.append(f"  {label:56}" + "".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
