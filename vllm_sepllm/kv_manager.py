"""Scheduler side: the SepLLM KV-cache spec and its block manager.

Workers report :class:`SepLLMSpec` for every attention layer when SEPLLM is selected; vLLM's
KV-cache-spec registry then builds a :class:`SepLLMManager` for the group. The manager is
vLLM's full-attention manager plus, per request, a :class:`~vllm_sepllm.policy.RequestCache`:

* block demand counts cached tokens (``logical - D``), not logical tokens;
* :meth:`SepLLMManager.evict` runs the retention policy, compacts the request's cache into its
  lowest blocks and returns the freed tail blocks to vLLM's block pool;
* ``pop_blocks_for_free`` (finish, abort, preemption) drops the request's record with its
  blocks.

Prefix caching (vLLM's, unchanged: hashes, hits, LRU) works as long as no hashed or shared
block is ever written. A request registers blocks only while its cache is still laid out by
position (nothing evicted yet: ``D = 0``); its first eviction copies the retained tokens out
of every hashed or shared block into private ones and lets go of them
(:meth:`SepLLMManager.evict`, ``policy.RequestCache`` "Copy-out"), so they stay valid cache
entries for every other request. The scheduler defers eviction until the prompt is computed
(scheduler.py), so every full prompt block is registered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    register_all_kvcache_specs,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sepllm.policy import Compaction, RequestCache, Retention


@dataclasses.dataclass(frozen=True, kw_only=True)
class SepLLMSpec(FullAttentionSpec):
    """A full-attention layer whose KV the SepLLM manager evicts and compacts."""

    @classmethod
    def from_full(cls, spec: FullAttentionSpec) -> SepLLMSpec:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        return cls(**fields)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """KV one request can need: with a separator cap, at most a + s + w tokens plus one
        prefill chunk, whatever max_model_len is (vLLM's start-up check and its concurrency
        estimate use this). Without a cap, separators accumulate: the full-attention bound."""
        from vllm_sepllm.patches import engine_sepllm_config

        full = super().max_memory_usage_bytes(vllm_config)
        cap = engine_sepllm_config(vllm_config).max_cache_tokens
        if cap is None or vllm_config.cache_config.enable_prefix_caching:
            return full  # with prefix caching a prompt is held whole until it is computed
        tokens = cap + vllm_config.scheduler_config.max_num_batched_tokens
        return min(full, cdiv(tokens, self.block_size) * self.page_size_bytes)


class SepLLMManager(FullAttentionManager):
    """Full-attention block manager whose requests hold only their retained tokens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.caches: dict[str, RequestCache] = {}
        #: Blocks returned to the pool by compaction since start-up (a metric).
        self.num_blocks_freed = 0
        #: Tokens a waiting request is assumed to need at admission (set by the scheduler):
        #: about a + s + w + one chunk instead of the whole prompt.
        self.admission_token_cap: int | None = None
        #: Most blocks each live request has held at once (reported when it finishes).
        self.peak_blocks: dict[str, int] = {}
        #: ``sepllm.cache_size`` (set by the scheduler): batched eviction, see policy.py.
        self.cache_size: int | None = None
        #: Requests whose cache was copied out of shared blocks since the scheduler last
        #: cleared this (their workers need the whole new block list).
        self.copied_out: set[str] = set()

    # -------------------------------------------------------------- SepLLM operations
    def evict(self, request_id: str, num_computed: int, token_ids: Sequence[int],
              retention: Retention, sep_ids: Collection[int],
              slot_moves: tuple[list[int], list[int]] | None = None,
              deferred_free: list[KVCacheBlock] | None = None) -> Compaction | None:
        """Evict what the request's next query cannot see, compact, free the tail blocks.

        ``slot_moves``: lists to which the moves are appended as physical KV slots
        (``block_id * block_size + offset``, through the block list *before* the tail is
        freed: the sources lie in the freed blocks), as the workers apply them.
        ``deferred_free``: blocks that hold move sources go here instead of back to the pool
        (the caller frees them once every request of the step has evicted, so that no other
        request's copy-out gets one of them as a destination of the same step's moves).

        Returns None when a copy-out needs fresh blocks the pool cannot give: the request's
        record is then inconsistent with its blocks and the caller must preempt it.
        """
        cache = self.caches.get(request_id)
        if cache is None:
            cache = self.caches[request_id] = RequestCache(retention, sep_ids,
                                                           self.cache_size)
        blocks = self.req_to_blocks[request_id]
        is_private = None
        tight = False
        if self.enable_caching and cache.num_evicted == 0:
            # Only before the first eviction can the request hold hashed or shared blocks.
            # When the pool might not hold the copy-out's fresh blocks (at most those of the
            # retained a + s + w tokens), the blocks no other request holds count as private
            # too: their cache entries are dropped before they are written (else the request
            # would be preempted, come back through its own prefix hits and be short again).
            need = len(blocks)
            if retention.sep_cap is not None:
                kept = retention.num_sinks + retention.sep_cap + retention.window
                need = min(need, cdiv(kept, self.block_size) + 1)
            tight = self.block_pool.get_num_free_blocks() < need

            def is_private(b: int) -> bool:
                block = blocks[b]
                return block.ref_cnt == 1 and (tight or block.block_hash is None)
        compaction = cache.advance(num_computed, token_ids, self.block_size, is_private)
        if not compaction.num_evicted:
            return compaction
        if compaction.blocks is not None:
            return self._copy_out(request_id, compaction, slot_moves, deferred_free, tight)
        bs = self.block_size
        if tight:
            self._uncache(blocks[:cdiv(len(cache), bs)])
        self._slot_moves(compaction, blocks, blocks, slot_moves)
        keep = cdiv(len(cache), bs)
        if keep < len(blocks):
            tail = blocks[keep:]
            del blocks[keep:]
            tail.reverse()  # the last block first: vLLM's order of eviction priority
            self._release(tail, deferred_free)
            self.num_blocks_freed += len(tail)
        return compaction

    def _slot_moves(self, compaction: Compaction, src_blocks: Sequence[KVCacheBlock],
                    dst_blocks: Sequence[KVCacheBlock],
                    slot_moves: tuple[list[int], list[int]] | None) -> None:
        """Append the compaction's moves to ``slot_moves`` as physical slots: sources through
        ``src_blocks``, destinations through ``dst_blocks``."""
        if slot_moves is None or not compaction.src:
            return
        bs = self.block_size
        src_slots, dst_slots = slot_moves
        src_slots.extend(src_blocks[i // bs].block_id * bs + i % bs for i in compaction.src)
        dst_slots.extend(dst_blocks[i // bs].block_id * bs + i % bs for i in compaction.dst)

    def _release(self, blocks: list[KVCacheBlock],
                 deferred_free: list[KVCacheBlock] | None) -> None:
        """Give up ``blocks``, which hold move sources: to the pool now, or to the caller's
        ``deferred_free`` (see :meth:`evict`)."""
        if deferred_free is None:
            self.block_pool.free_blocks(blocks)
        else:
            deferred_free.extend(blocks)

    def _copy_out(self, request_id: str, compaction: Compaction,
                  slot_moves: tuple[list[int], list[int]] | None,
                  deferred_free: list[KVCacheBlock] | None, tight: bool) -> Compaction | None:
        """Apply a copy-out layout (``compaction.blocks``): fresh blocks from the pool, moves
        as physical slots, and every block the new layout does not use released (hashed
        ones stay in vLLM's prefix cache)."""
        bs = self.block_size
        old = self.req_to_blocks[request_id]
        chosen = {b for b in compaction.blocks if b >= 0}
        sources = {i // bs for i in compaction.src}
        # Blocks the request lets go of and no move reads: free now, so that their room can
        # serve the fresh blocks.
        idle = [blk for b, blk in enumerate(old) if b not in chosen and b not in sources]
        busy = [old[b] for b in sorted(sources, reverse=True) if b not in chosen]
        idle.reverse()
        self.block_pool.free_blocks(idle)
        num_fresh = compaction.blocks.count(-1)
        if num_fresh > self.block_pool.get_num_free_blocks():
            old[:] = [blk for b, blk in enumerate(old) if b in chosen or b in sources]
            self.num_blocks_freed += len(idle)
            return None
        if tight:
            self._uncache([old[b] for b in chosen])
        fresh = iter(self.block_pool.get_new_blocks(num_fresh))
        new = [old[b] if b >= 0 else next(fresh) for b in compaction.blocks]
        self._slot_moves(compaction, old, new, slot_moves)
        self.num_blocks_freed += len(old) - len(new)
        old[:] = new
        self.copied_out.add(request_id)
        self._release(busy, deferred_free)
        return compaction

    def _uncache(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Drop the prefix-cache entries of ``blocks`` (held by one request only), which are
        about to be written."""
        ids = {b.block_id for b in blocks if b.block_hash is not None}
        if ids:
            self.block_pool.evict_blocks(ids)

    def num_dropped(self, request_id: str) -> int:
        """``D`` of the request (tokens dropped so far; 0 without a record)."""
        cache = self.caches.get(request_id)
        return 0 if cache is None else cache.num_evicted

    # -------------------------------------------------------------- vLLM overrides
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence, total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False, **kwargs) -> int:
        # kwargs: vLLM 0.32+'s ``prefill_end`` (a Mamba checkpoint rule; full attention
        # ignores it), passed on to vLLM's own rule.
        if new_computed_blocks:
            # Admission with prefix-cache hits (nothing evicted yet, D = 0): vLLM's own rule.
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap,
                **kwargs)
        # vLLM's rule on the cached tokens (num_tokens - D), written out: it runs for every
        # scheduled request every step (benchmarks/host_step.py). Without prefix hits, full
        # attention skips nothing and a request holds no evictable block, so vLLM's rule
        # reduces to the blocks the cached tokens need beyond those held
        # (tests/test_manager_fuzz.py compares it with vLLM's own).
        num_tokens -= self.num_dropped(request_id)
        if apply_admission_cap and self.admission_token_cap is not None:
            num_tokens = min(num_tokens, self.admission_token_cap)
        held = self.req_to_blocks.get(request_id)
        return max(cdiv(num_tokens, self.block_size) - (len(held) if held else 0), 0)

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int):
        dropped = self.num_dropped(request_id)
        held = self.req_to_blocks.get(request_id)
        if (held is not None and cdiv(num_tokens - dropped, self.block_size) <= len(held)
                and request_id not in self._partial_hit_reqs):
            return []  # most decode steps: the last block has room (vLLM's rule, short-cut)
        new_blocks = super().allocate_new_blocks(
            request_id, num_tokens - dropped, num_tokens_main_model - dropped
        )
        if new_blocks:  # the count only grows here
            held = len(self.req_to_blocks[request_id])
            if held > self.peak_blocks.get(request_id, 0):
                self.peak_blocks[request_id] = held
        return new_blocks

    def request_stats(self, request_id: str, num_computed: int) -> dict[str, float] | None:
        """Per-request KV figures once ``num_computed`` tokens have KV: tokens, retained and
        evicted tokens, retained ratio, and the most blocks held at once."""
        if not num_computed:
            return None
        cache = self.caches.get(request_id)
        evicted = 0 if cache is None else cache.num_evicted
        # Tokens computed after the last eviction are retained (they are not evicted yet).
        retained = num_computed - evicted
        return {
            "tokens": num_computed,
            "kv_retained": retained,
            "kv_evicted": evicted,
            "retained_ratio": retained / num_computed,
            "peak_kv_blocks": self.peak_blocks.get(request_id, 0),
        }

    def pop_blocks_for_free(self, request_id: str):
        # Every way out (finish, abort, preemption, vLLM's deferred free) comes through here.
        self.caches.pop(request_id, None)
        self.peak_blocks.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:  # noqa: ANN001
        # Only a cache still laid out by position (nothing evicted: block i holds tokens
        # [i * block_size, (i + 1) * block_size)) matches the request's block hashes.
        if not self.num_dropped(request.request_id):
            super().cache_blocks(request, num_tokens, *args, **kwargs)


def _register() -> None:
    # The registry fills in vLLM's built-in specs only while it is empty: do that first.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        SepLLMSpec, SepLLMManager, uniform_type_base_spec=FullAttentionSpec
    )


# Registered on import: unpickling a SepLLMSpec (engine core receives the workers' specs)
# imports this module, so the registry knows the spec before KV-cache groups are formed.
_register()
