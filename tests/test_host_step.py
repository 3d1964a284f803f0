"""vLLM's real scheduler loop with SEPLLM, no model (``benchmarks/host_step.py``'s driver).

``SepLLMAsyncScheduler`` as EngineCore builds it for SmolLM2's config, over a real block pool,
driven by ``schedule()`` then ``update_from_output()`` with replayed real-text tokens. After every step: each scheduled request holds exactly the
blocks its cached tokens need (``cdiv(n - D + q, block_size)``), never more than
``a + s + w`` (or ``c``) tokens stay from before the step, the block demand for the next token
is vLLM's own rule applied to the cached tokens, the step's plan carries as many KV moves as its
compactions produced, the blocks held plus the free blocks are the pool, and the pool (sized
for the retained KV, not the logical lengths) never forces a preemption. At the end no block and
no cache record is left. The cache table's rows agree with the block lists after every step,
and the batched scheduler's plans equal those of the per-request path (the manager without its
table) step by step.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import real_prompts_and_continuations
from benchmarks.host_step import Driver, build
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm_sepllm.scheduler import PLAN_ATTR

#: Enough for every request's retained KV plus a chunk (24 x 8 blocks + 256 tokens), far from
#: enough for their logical lengths (24 x 29): block demand must count cached tokens, or the
#: scheduler preempts.
NUM_BLOCKS = 400
BLOCK = 16


@pytest.mark.parametrize("cache_size", [None, 120])
def test_scheduler_loop_keeps_exact_block_accounting(model_path, tokenizer, cache_size):
    a, s, w = 4, 16, 64
    cfg = {"num_sinks": a, "sep_cap": s, "window": w}
    if cache_size is not None:
        cfg["cache_size"] = cache_size
    sched = build("SEPLLM", model_path, cfg, NUM_BLOCKS, max_num_seqs=24, max_batched=256)
    prompts, conts = real_prompts_and_continuations(tokenizer, 24, 300, 160, seed=3)
    out_len = 150
    driver = Driver(sched, prompts, conts, out_len)
    mgr = sched.sepllm_manager
    pool = sched.kv_cache_manager.block_pool
    keep = a + s + w if cache_size is None else cache_size
    steps = evictions = 0
    while sched.requests:
        driver.step()
        steps += 1
        out = driver.last_output
        plan = getattr(out, PLAN_ATTR)
        assert len(plan.src) == len(plan.dst)
        for rid, q in out.num_scheduled_tokens.items():
            req = sched.requests.get(rid)
            if req is None:  # finished in this step's update
                continue
            n0 = req.num_computed_tokens - q  # tokens computed before this step
            cached = n0 - mgr.num_dropped(rid)
            if n0:  # a request admitted this step starts from nothing
                assert cached <= keep, (rid, n0, cached)
            assert len(mgr.req_to_blocks[rid]) == cdiv(cached + q, BLOCK), rid
            # Next step's block demand: vLLM's own rule on the cached tokens.
            n = n0 + q
            need = n + 1 - mgr.num_dropped(rid)
            assert mgr.get_num_blocks_to_allocate(rid, n + 1, [], n, n, n + 1) == \
                FullAttentionManager.get_num_blocks_to_allocate(mgr, rid, need, [], n, n, need)
        evictions += len(plan.compactions)
        mgr.check_table()
        # make_stats sums D over the records: only running requests hold one.
        assert set(mgr.dropped) <= {r.request_id for r in sched.running}
        held = sum(len(b) for b in mgr.req_to_blocks.values())
        assert held + pool.get_num_free_blocks() == NUM_BLOCKS - 1  # block 0: the null block
        assert not any(r.num_preemptions for r in sched.requests.values())
        assert steps < 2000
    assert evictions > 0
    assert not mgr.caches and not mgr.dropped and not any(mgr.req_to_blocks.values())
    assert mgr.table is not None and not len(mgr.table)
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1


@pytest.mark.parametrize("cache_size", [None, 120])
def test_batched_plans_equal_per_request_plans(model_path, tokenizer, cache_size):
    """Two SEPLLM schedulers on the same requests in lockstep, one with the cache table (the
    batched path), one without (every record a RequestCache, as before the table): every
    step's plan carries the same D, compactions, retention, copy-outs and number of moves, the
    managers hold the same records and block counts, and every finished request reports the
    same KV figures (blocks freed by compaction, compactions included)."""
    cfg = {"num_sinks": 4, "sep_cap": 16, "window": 64}
    if cache_size is not None:
        cfg["cache_size"] = cache_size
    prompts, conts = real_prompts_and_continuations(tokenizer, 24, 300, 160, seed=5)
    drivers = []
    figures: list[dict] = [{}, {}]
    for use_table in (True, False):
        sched = build("SEPLLM", model_path, cfg, NUM_BLOCKS, max_num_seqs=24, max_batched=256)
        sched.sepllm_manager.use_table = use_table

        def free(request, *a, __orig=sched._free_request, __out=figures[len(drivers)], **k):
            kv_params, ec_params = __orig(request, *a, **k)
            __out[request.request_id] = kv_params["sepllm"]
            return kv_params, ec_params

        sched._free_request = free
        drivers.append(Driver(sched, prompts, conts, 150))
    batched_rows = steps = 0
    while drivers[0].sched.requests:
        plans = []
        for d in drivers:
            d.step()
            plans.append(getattr(d.last_output, PLAN_ATTR))
        a, b = plans
        assert a.dropped == b.dropped and a.compactions == b.compactions
        assert a.retention == b.retention and a.masked_single == b.masked_single
        assert a.block_ids.keys() == b.block_ids.keys()
        assert len(a.src) == len(b.src) == len(a.dst)
        assert isinstance(a.src, np.ndarray)
        ma, mb = (d.sched.sepllm_manager for d in drivers)
        assert ma.dropped == mb.dropped
        assert {r: len(v) for r, v in ma.req_to_blocks.items()} == \
            {r: len(v) for r, v in mb.req_to_blocks.items()}
        batched_rows += len(ma.table or ())
        assert not len(mb.table or ())
        steps += 1
        assert steps < 2000
    assert not drivers[1].sched.requests
    assert batched_rows > 1000
    assert len(figures[0]) == 24 and figures[0] == figures[1]
    assert sum(f["compactions"] for f in figures[0].values()) > 24
    assert sum(f["kv_blocks_freed"] for f in figures[0].values()) > 24
    assert not drivers[0].sched.sepllm_manager.caches
    assert not drivers[1].sched.sepllm_manager.caches
