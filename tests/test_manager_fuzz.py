"""Invariants fuzz of the scheduler-side block manager: no model, no engine.

A real vLLM ``BlockPool`` (prefix caching off) and a :class:`SepLLMManager` built the way vLLM
builds it (``get_manager_for_kv_cache_spec`` on a :class:`SepLLMSpec`) are driven by seeded
random operations that mimic what vLLM's scheduler (wrapped by ``SepLLMScheduler``) does to
each request: add, admit (with the admission gate), schedule a step (evict first, as
``SepLLMScheduler.schedule`` does, then ``allocate_slots``' sequence: ``remove_skipped_blocks``,
``get_num_blocks_to_allocate`` exactly as the coordinator calls it, a free-block check and
``allocate_new_blocks``; when the pool is short a running request is preempted, possibly the
one being scheduled), run the step (chunked prefill or one decode token; a new token is
sampled when the request caught up), stand-alone eviction (running but unscheduled requests
are evicted too), abort, preempt (re-admitted later from ``num_computed = 0`` with all its
tokens as the prompt), finish; plus a whole-batch step (evict every running request, then
allocate for each in order, then run them all).

The worker is mirrored too: per request, the worker's block list (truncated to the kept
blocks after a compaction, extended by the new blocks of each allocation) and a simulated
physical KV store (slot -> which request incarnation wrote which logical position). A
compaction's moves are applied with all reads before all writes, through the *old* block list
(the sources lie in blocks the manager already freed), then the list is truncated; the KV of
a new token at position ``p`` is written at cache index ``p - D``. A per-request logical array
(cache index -> position) follows the same moves and appends.

Checked after every operation: blocks are conserved (free + held == usable), each block is
either held once or in the free queue once (ref counts 1 / 0), the null block is never handed
out, every running request holds exactly ``cdiv(cached tokens, block_size)`` blocks, the
manager's cache record equals the mirrored KV array, ``len(cache) == num_computed - D``, the
worker's block list equals the manager's, and (after each eviction) the cached positions are
exactly ``retained_positions`` of the current ``num_computed``; and the physical KV every
running request would read is checked slot by slot. At the end every request is freed and no
block, cache record or block-list entry may be left.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    get_manager_for_kv_cache_spec,
)
from vllm_sepllm.kv_manager import SepLLMManager, SepLLMSpec
from vllm_sepllm.policy import Retention, retained_positions

BLOCK_SIZE = 16
SEP_IDS = frozenset({1, 2, 3})
VOCAB = 1000
MAX_MODEL_LEN = 480  # < 64 blocks * 16: a request alone always fits the smallest pool
# (seed, usable blocks, admission gate on the full prompt, max live requests): small pools and
# many requests force preemption on allocation failure.
CASES = [(0, 64, True, 16), (1, 64, False, 24), (2, 80, True, 16), (3, 96, False, 24),
         (4, 128, False, 24), (5, 256, True, 24)]
#: Batched eviction (``sepllm.cache_size``): (seed, usable blocks, admission gate, max live, c);
#: c is above every a + s + w that random_retention draws (at most 6 + 8 + 64).
LAZY_CASES = [(10, 64, True, 16, 80), (11, 128, False, 24, 96)]
OPS_PER_SEED = 2500

WAITING, RUNNING = "waiting", "running"
OPS_DONE: dict[int, int] = {}  # seed -> operations run (for the total check)


class Req:
    """One request as the scheduler and the worker see it."""

    def __init__(self, rid: str, max_out: int, retention: Retention, sep_density: float):
        self.rid = rid
        self.sep_density = sep_density
        self.tokens: list[int] = []  # all token ids: prompt + sampled
        self.num_out = 0
        self.max_out = max_out
        self.retention = retention
        self.status = WAITING
        self.num_computed = 0
        self.incarnation = 0  # bumped on every (re-)admission: tags the physical KV it writes
        self.kv: list[int] = []  # worker mirror: cache index -> logical position
        self.wblocks: list[int] = []  # worker mirror: the request's block ids


class Fuzzer:
    def __init__(self, seed: int, num_usable: int, reserve_full_isl: bool, max_live: int,
                 cache_size: int | None = None):
        self.rng = rng = random.Random(seed)
        self.num_usable = num_usable
        # BlockPool takes block 0 as the null block: one more than the usable blocks.
        self.pool = BlockPool(num_gpu_blocks=self.num_usable + 1, enable_caching=False,
                              hash_block_size=BLOCK_SIZE)
        spec = SepLLMSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=8,
                          dtype=torch.float16)
        mgr = get_manager_for_kv_cache_spec(
            spec, max_in_flight_tokens=4096, max_model_len=MAX_MODEL_LEN,
            block_pool=self.pool, enable_caching=False, kv_cache_group_id=0,
            scheduler_block_size=BLOCK_SIZE,
        )
        assert type(mgr) is SepLLMManager
        self.mgr: SepLLMManager = mgr
        mgr.cache_size = self.cache_size = cache_size
        self.max_chunk = rng.choice([8, 32, 64, 128])
        # The scheduler sets an admission cap of a + s + w + one chunk when s is not None.
        mgr.admission_token_cap = rng.choice([None, 6 + 8 + 64 + self.max_chunk])
        self.max_live = max_live
        # vLLM's scheduler_reserve_full_isl (default True): admission gate on the full prompt.
        self.reserve_full_isl = reserve_full_isl
        self.reqs: dict[str, Req] = {}
        self.running: list[Req] = []  # scheduling order, like Scheduler.running
        self.next_id = 0
        self.next_incarnation = 0
        # Physical KV store: which request incarnation wrote which logical position into
        # each slot (two parallel arrays; -1: never written).
        num_slots = (self.num_usable + 1) * BLOCK_SIZE
        self.phys_owner = [-1] * num_slots
        self.phys_pos = [-1] * num_slots
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------------ helpers
    def token(self, req: Req) -> int:
        if self.rng.random() < req.sep_density:
            return self.rng.choice(sorted(SEP_IDS))
        return self.rng.randrange(len(SEP_IDS) + 1, VOCAB)

    def random_retention(self) -> Retention:
        r = self.rng
        # No cap (half of the requests) lets caches grow and the pool run short.
        return Retention(num_sinks=r.randint(0, 6),
                         sep_cap=r.choice([None, None, None, 0, 1, 8]),
                         window=r.randint(1, 64))

    def blocks_of(self, req: Req) -> list[int]:
        return [b.block_id for b in self.mgr.req_to_blocks.get(req.rid, ())]

    def slot(self, req: Req, index: int) -> int:
        return req.wblocks[index // BLOCK_SIZE] * BLOCK_SIZE + index % BLOCK_SIZE

    # ------------------------------------------------------------------ scheduler actions
    def free(self, req: Req) -> None:
        """What vLLM does on finish, abort and preemption: free the request's blocks."""
        self.mgr.free(req.rid)
        req.num_computed = 0
        req.kv = []
        req.wblocks = []

    def preempt(self, req: Req) -> None:
        assert req.status == RUNNING
        self.running.remove(req)
        self.free(req)
        req.status = WAITING  # re-admitted with all its tokens so far as the prompt
        self.stats["preempt"] += 1

    def remove(self, req: Req) -> None:
        """Finish or abort (running or waiting)."""
        if req.status == RUNNING:
            self.running.remove(req)
        self.free(req)
        del self.reqs[req.rid]

    def evict(self, req: Req) -> None:
        """``SepLLMScheduler.schedule`` before vLLM schedules; the worker applies the moves
        (reads before writes, through its old block list) and truncates its block list."""
        n = req.num_computed
        assert req.status == RUNNING and n > 0
        cache_before = self.mgr.caches.get(req.rid)
        already = cache_before is not None and cache_before.num_computed == n
        blocks_before = len(self.blocks_of(req))
        slots_before = {i: self.slot(req, i) for i in range(len(req.kv))}
        slot_moves: tuple[list[int], list[int]] = ([], [])
        comp = self.mgr.evict(req.rid, n, req.tokens, req.retention, SEP_IDS, slot_moves)
        cache = self.mgr.caches[req.rid]
        self.stats["evict"] += 1
        if self.cache_size is not None and cache.num_computed != n:
            # Batched eviction not due: nothing moves while the cache holds at most c tokens.
            assert comp.num_evicted == 0 and slot_moves == ([], [])
            assert n - cache.num_dropped == len(req.kv) <= self.cache_size
            assert len(self.blocks_of(req)) == blocks_before
            self.stats["evict_deferred"] += 1
            return
        if already:
            assert comp.num_evicted == 0 and not comp.src and not comp.dst
        new_len = len(req.kv) - comp.num_evicted
        assert new_len == len(cache)
        srcs, dsts = comp.src, comp.dst
        assert len(srcs) == len(dsts)
        # The moves as the workers get them: physical slots through the block list before
        # the tail was freed.
        assert slot_moves == ([slots_before[i] for i in srcs], [slots_before[i] for i in dsts])
        assert len(set(srcs)) == len(srcs) and len(set(dsts)) == len(dsts)
        assert all(s >= new_len > d >= 0 for s, d in zip(srcs, dsts))
        assert all(s < len(req.kv) for s in srcs)
        if comp.num_evicted:
            self.stats["evict_nonempty"] += 1
            self.stats["moves"] += len(srcs)
            num_blocks = len(self.blocks_of(req))  # what the plan carries
            freed = blocks_before - num_blocks
            assert freed == blocks_before - cdiv(new_len, BLOCK_SIZE)
            self.stats["blocks_freed"] += freed
            # Worker: move physical slots (all reads first), then the logical array.
            src_slots = [self.slot(req, s) for s in srcs]
            vals = [(self.phys_owner[s], self.phys_pos[s]) for s in src_slots]
            for dst, (owner, pos) in zip(dsts, vals):
                dst_slot = self.slot(req, dst)
                self.phys_owner[dst_slot], self.phys_pos[dst_slot] = owner, pos
            lvals = [req.kv[s] for s in srcs]
            for d, v in zip(dsts, lvals):
                req.kv[d] = v
            del req.kv[new_len:]
            del req.wblocks[num_blocks:]
        else:
            assert len(self.blocks_of(req)) == blocks_before
        # The cache holds exactly R(n), and the KV the worker holds is that cache.
        assert cache.num_computed == n
        assert sorted(cache.slots) == retained_positions(req.tokens, n, SEP_IDS,
                                                         req.retention)
        assert req.kv == cache.slots
        assert len(self.blocks_of(req)) == cdiv(len(cache), BLOCK_SIZE)

    def demand(self, req: Req, num_tokens: int, **kw) -> int:
        """``get_num_blocks_to_allocate`` called as the coordinator calls it (positional),
        cross-checked against the keyword form."""
        m = self.mgr
        total_computed = req.num_computed
        got = m.get_num_blocks_to_allocate(req.rid, num_tokens, [], total_computed,
                                           total_computed, num_tokens, **kw)
        got_kw = m.get_num_blocks_to_allocate(
            req.rid, num_tokens, new_computed_blocks=[], total_computed_tokens=total_computed,
            num_local_computed_tokens=total_computed, num_tokens_main_model=num_tokens, **kw)
        assert got == got_kw
        # vLLM's own rule on the cached tokens (our override writes it out without the
        # prefix-caching branches).
        cached = num_tokens - m.num_dropped(req.rid)
        if kw.get("apply_admission_cap") and m.admission_token_cap is not None:
            cached = min(cached, m.admission_token_cap)
        assert got == FullAttentionManager.get_num_blocks_to_allocate(
            m, req.rid, cached, [], total_computed, total_computed, cached)
        return got

    def try_allocate(self, req: Req, num_new: int) -> bool:
        """``KVCacheManager.allocate_slots`` without prefix caching / lookahead."""
        m = self.mgr
        num_tokens = req.num_computed + num_new
        m.remove_skipped_blocks(req.rid, req.num_computed, len(req.tokens))
        need = self.demand(req, num_tokens)
        cached = num_tokens - m.num_dropped(req.rid)
        assert need == max(cdiv(cached, BLOCK_SIZE) - len(self.blocks_of(req)), 0)
        if need > self.pool.get_num_free_blocks():
            return False
        new = m.allocate_new_blocks(req.rid, num_tokens, num_tokens)
        assert len(new) == need
        assert not any(b.is_null or b.block_id == 0 for b in new)
        req.wblocks.extend(b.block_id for b in new)  # scheduler output's new block ids
        assert len(self.blocks_of(req)) == cdiv(cached, BLOCK_SIZE)
        self.stats["alloc_blocks"] += need
        return True

    def allocate_running(self, req: Req, num_new: int) -> bool:
        """Allocate for a running request, preempting random running requests until it fits
        (vLLM preempts its lowest-priority one: possibly the request itself)."""
        while not self.try_allocate(req, num_new):
            self.stats["oom"] += 1
            victim = self.rng.choice(self.running)
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def admit(self, req: Req) -> int:
        """A waiting request enters running (vLLM: no preemption for waiting requests).
        Returns the tokens scheduled for it, 0 when it stays waiting."""
        assert req.status == WAITING and req.num_computed == 0
        assert req.rid not in self.mgr.caches and not self.blocks_of(req)
        full = min(len(req.tokens), MAX_MODEL_LEN)
        gate = self.demand(req, full, apply_admission_cap=True)
        assert gate <= self.demand(req, full)
        if not self.reserve_full_isl:
            gate = 0
        num_new = self.chunk(req)
        if gate > self.pool.get_num_free_blocks() or not self.try_allocate(req, num_new):
            self.stats["admit_refused"] += 1
            return 0
        req.status = RUNNING
        req.incarnation = self.next_incarnation
        self.next_incarnation += 1
        self.running.append(req)
        self.stats["admit"] += 1
        return num_new

    def chunk(self, req: Req) -> int:
        remaining = len(req.tokens) - req.num_computed
        assert remaining >= 1
        return min(remaining, self.rng.randint(1, self.max_chunk))

    def run(self, req: Req, num_new: int) -> None:
        """The worker computes positions [n, n + num_new) at cache index p - D."""
        n = req.num_computed
        d = self.mgr.num_dropped(req.rid)
        assert len(req.kv) == n - d
        assert (n + num_new - d) <= len(req.wblocks) * BLOCK_SIZE
        for p in range(n, n + num_new):
            i = self.slot(req, p - d)
            self.phys_owner[i], self.phys_pos[i] = req.incarnation, p
            req.kv.append(p)
        req.num_computed = n + num_new
        self.stats["tokens"] += num_new
        if req.num_computed == len(req.tokens):
            # Caught up: a token is sampled; the request may stop.
            if req.num_out >= req.max_out or len(req.tokens) >= MAX_MODEL_LEN:
                self.remove(req)
                self.stats["finish"] += 1
                return
            req.tokens.append(self.token(req))
            req.num_out += 1

    def step_one(self, req: Req) -> None:
        """One scheduler step in which only ``req`` is scheduled."""
        if req.status == WAITING:
            num_new = self.admit(req)
            if num_new:
                self.run(req, num_new)
            return
        if req.num_computed:
            self.evict(req)
        num_new = self.chunk(req)
        if self.allocate_running(req, num_new):
            self.run(req, num_new)

    def step_all(self) -> None:
        """A batch step: evict every running request, then allocate for each in order
        (preempting on shortage), admit waiting ones while blocks last (not after a
        preemption, like vLLM), then run all scheduled requests still running."""
        for req in list(self.running):
            if req.num_computed:
                self.evict(req)
        scheduled: dict[str, tuple[Req, int]] = {}
        preempted_before = self.stats["preempt"]
        for req in list(self.running):
            if req.status != RUNNING:  # preempted by an earlier request of this step
                continue
            num_new = self.chunk(req)
            if self.allocate_running(req, num_new):
                scheduled[req.rid] = (req, num_new)
        if self.stats["preempt"] != preempted_before:
            # vLLM schedules no waiting request in a step that preempted one.
            waiting = []
        else:
            waiting = [r for r in self.reqs.values() if r.status == WAITING]
        for req in waiting:
            num_new = self.admit(req)
            if not num_new:
                break
            scheduled[req.rid] = (req, num_new)
        for req, num_new in scheduled.values():
            if req.status == RUNNING:
                self.run(req, num_new)

    # ------------------------------------------------------------------ operations
    def op(self) -> str:
        rng = self.rng
        live = list(self.reqs.values())
        running = self.running
        kind = rng.choices(
            ["add", "step", "step_all", "evict", "abort", "preempt", "finish"],
            weights=[4, 30, 6, 5, 0.5, 0.5, 0.5],
        )[0]
        if kind == "add" or not live:
            if len(live) >= self.max_live:
                kind = "step"
            else:
                rid = f"r{self.next_id}"
                self.next_id += 1
                req = Req(rid, rng.randint(1, 300), self.random_retention(),
                          rng.choice([0.0, 0.05, 0.2, 0.5, 0.9, 1.0]))
                req.tokens = [self.token(req) for _ in range(rng.randint(1, 240))]
                self.reqs[rid] = req
                return "add"
        if kind == "step":
            self.step_one(rng.choice(live))
        elif kind == "step_all":
            self.step_all()
        elif kind == "evict":
            cands = [r for r in running if r.num_computed]
            if cands:
                self.evict(rng.choice(cands))
        elif kind == "abort":
            self.remove(rng.choice(live))
        elif kind == "preempt":
            if running:
                self.preempt(rng.choice(running))
        elif kind == "finish":
            if running:
                self.remove(rng.choice(running))
        return kind

    # ------------------------------------------------------------------ invariants
    def check(self) -> None:
        m, pool = self.mgr, self.pool
        held = [b for blocks in m.req_to_blocks.values() for b in blocks]
        held_ids = [b.block_id for b in held]
        free_ids = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
        assert pool.get_num_free_blocks() == len(free_ids)
        assert pool.get_num_free_blocks() + len(held) == self.num_usable
        assert len(set(held_ids)) == len(held_ids), "a block is held twice"
        assert not set(held_ids) & set(free_ids), "a held block is also free"
        assert len(set(free_ids)) == len(free_ids)
        assert set(held_ids) | set(free_ids) == set(range(1, self.num_usable + 1))
        assert 0 not in held_ids and not any(b.is_null for b in held)
        assert all(b.ref_cnt == 1 for b in held)
        assert all(pool.blocks[i].ref_cnt == 0 for i in free_ids)
        running_ids = {r.rid for r in self.running}
        assert {k for k, v in m.req_to_blocks.items() if v} <= running_ids
        assert set(m.caches) <= running_ids
        assert all(r.status == RUNNING for r in self.running)
        for req in self.reqs.values():
            if req.status == WAITING:
                assert not self.blocks_of(req) and req.rid not in m.caches
                assert req.num_computed == 0 and not req.kv and not req.wblocks
                continue
            cache = m.caches.get(req.rid)
            slots = cache.slots if cache is not None else []
            cache_n = cache.num_computed if cache is not None else 0
            d = m.num_dropped(req.rid)
            assert d == cache_n - len(slots) >= 0
            assert req.kv == slots + list(range(cache_n, req.num_computed))
            assert len(req.kv) == req.num_computed - d
            assert len(set(req.kv)) == len(req.kv)
            assert req.wblocks == self.blocks_of(req)
            assert len(req.wblocks) == cdiv(len(req.kv), BLOCK_SIZE)
            # The KV attention would read: every cached slot holds what this incarnation of
            # the request wrote for that position (not another request's, not a stale one).
            n = len(req.kv)
            owner, pos = [], []
            for b in req.wblocks:
                owner += self.phys_owner[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]
                pos += self.phys_pos[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]
            assert pos[:n] == req.kv, req.rid
            assert owner[:n] == [req.incarnation] * n, req.rid

    def drain(self) -> None:
        for req in list(self.reqs.values()):
            self.remove(req)
        assert not self.running and not self.reqs
        assert self.pool.get_num_free_blocks() == self.num_usable, "leaked blocks"
        assert not any(self.mgr.req_to_blocks.values())
        assert not self.mgr.caches
        assert not self.mgr.num_cached_block
        self.check()


@pytest.mark.parametrize("seed,num_blocks,reserve_full_isl,max_live,cache_size",
                         [(*c, None) for c in CASES] + LAZY_CASES)
def test_manager_invariants_fuzz(seed, num_blocks, reserve_full_isl, max_live, cache_size):
    t0 = time.perf_counter()
    f = Fuzzer(seed, num_blocks, reserve_full_isl, max_live, cache_size)
    num_ops = 0
    for _ in range(OPS_PER_SEED):
        kind = f.op()
        f.stats["op_" + kind] += 1
        num_ops += 1
        f.check()
    f.drain()
    assert num_ops == OPS_PER_SEED
    s = f.stats
    # The run must have exercised what it claims to test.
    assert s["evict_nonempty"] > 50 and s["moves"] > 0 and s["blocks_freed"] > 0, s
    assert s["finish"] > 0 and s["op_abort"] > 0 and s["preempt"] > 0, s
    assert s["tokens"] > 1_000, s
    if cache_size is not None:
        assert s["evict_deferred"] > 100, s
    if num_blocks <= 128:
        assert s["oom"] > 0, s
    OPS_DONE[seed] = num_ops
    elapsed = time.perf_counter() - t0
    print(f"seed {seed}: {num_ops} ops, {f.num_usable} blocks, {elapsed:.2f}s, {dict(s)}")


def test_fuzz_total_ops():
    """Runs after the cases above (file order): at least 10,000 operations in all."""
    assert len(CASES) * OPS_PER_SEED >= 10_000
    if len(OPS_DONE) < len(CASES) + len(LAZY_CASES):
        pytest.skip("not every fuzz case ran in this session")
    assert sum(OPS_DONE.values()) >= 10_000
