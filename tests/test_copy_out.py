"""Copy-out through the real scheduler: the block list a worker keeps for each request.

``SepLLMScheduler`` (prefix caching on) as EngineCore builds it, over a real block pool, no
model (``benchmarks/host_step.py``'s way). The worker's block list is mirrored exactly as the
runner builds it: a new request takes its block ids, then each step ``_sepllm_compact`` (the
plan's new list for a copied-out request, else truncation to the blocks kept) runs before
vLLM's ``_update_states`` appends the step's new block ids (or replaces the list of a resumed
request). After every step, every scheduled request's list must equal the scheduler's.

A window of 17 keeps 16 tokens at the first eviction (``R(n)`` holds ``w - 1`` tokens when
``a = s = 0``): exactly one block, so the decode token of the copy-out step needs a new block
in the same step.
"""

from __future__ import annotations

import pytest
import torch

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm_sepllm.scheduler import PLAN_ATTR

BLOCK = 16


def build(model_path: str, sepllm: dict, num_blocks: int, async_scheduling: bool = False):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.structured_output import StructuredOutputManager

    import vllm_sepllm.patches as patches
    from vllm_sepllm.kv_manager import SepLLMSpec

    patches.install()
    vllm_config = EngineArgs(
        model=model_path, max_num_seqs=8, max_num_batched_tokens=256,
        enable_prefix_caching=True, block_size=BLOCK, async_scheduling=async_scheduling,
        max_model_len=1024, attention_backend="SEPLLM", additional_config={"sepllm": sepllm},
    ).create_engine_config()
    assert vllm_config.cache_config.enable_prefix_caching
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = SepLLMSpec.from_full(FullAttentionSpec(block_size=BLOCK, num_kv_heads=1,
                                                  head_size=64, dtype=torch.bfloat16))
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    cls = vllm_config.scheduler_config.get_scheduler_cls()
    return cls(vllm_config=vllm_config, kv_cache_config=kv_config,
               structured_output_manager=StructuredOutputManager(vllm_config),
               block_size=BLOCK, log_stats=False)


def test_copied_out_block_list_reaches_the_worker(model_path):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    sched = build(model_path, {"num_sinks": 0, "sep_cap": 0, "window": 17}, num_blocks=64)
    mgr = sched.sepllm_manager
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    prompt = list(range(100, 140))  # 40 tokens: two full blocks registered, one partial
    for rid in ("a", "b"):  # "b" hits the blocks of "a"
        sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=24, ignore_eos=True),
                                  None, block_hasher=hasher))
    worker: dict[str, list[int]] = {}
    copied_out = 0
    for _ in range(200):
        if not sched.requests:
            break
        out = sched.schedule()
        plan = getattr(out, PLAN_ATTR)
        copied_out += len(plan.block_ids)
        for new in out.scheduled_new_reqs:
            worker[new.req_id] = list(new.block_ids[0])
        for rid, num_blocks in plan.compactions.items():  # SepLLMRunnerMixin._sepllm_compact
            if rid in worker:
                if rid in plan.block_ids:
                    worker[rid][:] = plan.block_ids[rid]
                else:
                    del worker[rid][num_blocks:]
        cached = out.scheduled_cached_reqs  # vLLM's _update_states
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                worker[rid] = list(new_ids[0])
            elif new_ids is not None:
                worker[rid] += new_ids[0]
        for rid in out.num_scheduled_tokens:
            assert worker[rid] == [b.block_id for b in mgr.req_to_blocks[rid]], rid
        ids = list(out.num_scheduled_tokens)
        sampled = [[7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens
                   else [] for r in ids]
        sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled))
    assert not sched.requests and copied_out >= 2


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_short_copy_out_preempts_cleanly(model_path, async_scheduling):
    """A pool of 5 blocks, two requests sharing a 40-token prompt: a copy-out finds no free
    block, so the scheduler preempts that request before vLLM schedules (as vLLM's own
    reset_prefix_cache does). Under async scheduling its in-flight output is discarded and a
    same-step resumption carries all its token ids to the worker (the V1 runner reads them for
    a request it scheduled in the previous step). Every request finishes; nothing is left."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    sched = build(model_path, {"num_sinks": 0, "sep_cap": 0, "window": 33}, num_blocks=6,
                  async_scheduling=async_scheduling)
    preempted = 0
    ours = []
    preempt = sched._sepllm_preempt
    sched._sepllm_preempt = lambda request: (ours.append(request.request_id),
                                             preempt(request))
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    prompt = list(range(100, 140))
    for rid in ("a", "b"):
        sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=12, ignore_eos=True),
                                  None, block_hasher=hasher))
    outputs: dict[str, int] = {"a": 0, "b": 0}
    in_flight: list = []  # async: step k+1 is scheduled before step k's output comes back
    for _ in range(400):
        if not sched.requests and not in_flight:
            break
        if sched.requests:
            out = sched.schedule()
            preempted += len(out.preempted_req_ids or ())
            cached = out.scheduled_cached_reqs
            for rid in cached.resumed_req_ids:  # what the V1 runner needs to rebuild it
                assert rid in cached.all_token_ids, rid
            ids = list(out.num_scheduled_tokens)
            # A row samples when it computed every known token (num_computed_tokens counts
            # the step already).
            sampled = [[7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens
                       else [] for r in ids]
            in_flight.append((out, ModelRunnerOutput(
                req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=sampled)))
        if len(in_flight) > (1 if async_scheduling and sched.requests else 0):
            result = sched.update_from_output(*in_flight.pop(0))
            for eco in result.values():
                for o in eco.outputs:
                    outputs[o.request_id] += len(o.new_token_ids)
    assert not sched.requests, "requests left unfinished"
    assert outputs == {"a": 12, "b": 12}
    assert ours and preempted >= len(ours), "no copy-out ran short: the path is not tested"
    mgr = sched.sepllm_manager
    assert not mgr.caches and not any(mgr.req_to_blocks.values())
    pool = mgr.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
